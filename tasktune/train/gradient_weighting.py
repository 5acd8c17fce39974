"""The gradient-based loss weightings, GradNorm and PCGrad: both need each task's own
gradient on the shared parameters, so `backward` runs one backward pass per task
(see weighting.py for the interface every method shares)."""

from __future__ import annotations

import random

import torch
from torch import Tensor

from tasktune.train.weighting import Weighter, _backward_total, _weighted_sum


def _grad_norm(grads: tuple[Tensor | None, ...]) -> Tensor:
    parts = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    return torch.stack(parts).sum().sqrt() if parts else torch.zeros(())


class GradNormWeighter(Weighter):
    """Chen et al. (2018). The model gets grad of sum_i w_i L_i (w_i constants there). Then,
    with G_i = ||grad_W w_i L_i|| = w_i n_i on the shared params W, L~_i = L_i / L_i(0) and
    r_i = L~_i / mean_j L~_j, the target is mean(G) r_i^alpha (a constant), and
    L_grad = sum_i |G_i - target_i| has d/dw_i = sign(G_i - target_i) n_i, exactly. One Adam
    step on w over the present tasks, then w >= 1e-4 and sum w = K. L_i(0) is task i's
    first observed loss. A task that trains slower (higher r_i) or has a smaller gradient
    gets a larger weight."""

    method = "gradnorm"
    betas = (0.9, 0.999)
    eps = 1e-8

    def __init__(self, task_names: list[str], alpha: float, lr: float = 0.025):
        super().__init__(task_names)
        k = self.num_tasks
        self.alpha, self.lr = float(alpha), float(lr)
        self.weights = torch.ones(k)  # w: [K], sum K
        self.initial_losses: list[float | None] = [None] * k
        self._m, self._v, self._t = torch.zeros(k), torch.zeros(k), torch.zeros(k)  # Adam state per task

    def _backward(self, present, losses, shared, scale):
        norms = []
        for i, n in present:  # n_i = ||grad_W L_i||, the graph is kept for the main backward
            grads = torch.autograd.grad(losses[n], shared, retain_graph=True, allow_unused=True)
            norms.append(_grad_norm(grads).cpu())
        used = self.weights.tolist()
        _backward_total(self, _weighted_sum(present, losses, used), scale)
        current = torch.tensor([float(losses[n].detach()) for _, n in present])
        for (i, _), value in zip(present, current.tolist()):
            if self.initial_losses[i] is None:
                self.initial_losses[i] = value
        self._update(torch.tensor([i for i, _ in present]), torch.stack(norms), current)
        return {n: used[i] for i, n in present}

    def _update(self, idx: Tensor, norms: Tensor, current: Tensor) -> None:
        # idx, norms, current: [P] for the P tasks present
        w = self.weights[idx]
        g_norms = w * norms
        initial = torch.tensor([self.initial_losses[i] for i in idx.tolist()]).clamp_min(1e-12)
        inverse_rate = current / initial
        r = inverse_rate / inverse_rate.mean()
        target = g_norms.mean() * r.pow(self.alpha)
        grad = torch.sign(g_norms - target) * norms
        b1, b2 = self.betas
        self._t[idx] += 1
        self._m[idx] = b1 * self._m[idx] + (1 - b1) * grad
        self._v[idx] = b2 * self._v[idx] + (1 - b2) * grad * grad
        m_hat = self._m[idx] / (1 - b1 ** self._t[idx])
        v_hat = self._v[idx] / (1 - b2 ** self._t[idx])
        self.weights[idx] = w - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        self.weights.clamp_(min=1e-4)
        self.weights.mul_(self.num_tasks / self.weights.sum())

    def parameters(self) -> list[Tensor]:
        return [self.weights]

    def state_dict(self):
        adam = {"m": self._m.tolist(), "v": self._v.tolist(), "t": self._t.tolist()}
        return {**super().state_dict(), "weights": self.weights.tolist(), "initial_losses": self.initial_losses, "adam": adam}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.weights.copy_(torch.tensor(state["weights"], dtype=torch.float32))  # in place
        self.initial_losses = list(state["initial_losses"])
        adam = state["adam"]
        self._m, self._v, self._t = (torch.tensor(adam[k], dtype=torch.float32) for k in ("m", "v", "t"))


def pcgrad_combine(grads: Tensor, rng: random.Random) -> Tensor:
    """Yu et al. (2020): grads [K, D] -> [D]. Each task's gradient is projected onto the
    normal plane of every other task's (original) gradient it conflicts with (negative dot
    product), visiting the others in a random order; the projected gradients are summed."""
    out = grads.clone()
    for i in range(grads.shape[0]):
        others = [j for j in range(grads.shape[0]) if j != i]
        rng.shuffle(others)
        for j in others:
            dot = torch.dot(out[i], grads[j])
            if dot < 0:
                out[i] -= dot / torch.dot(grads[j], grads[j]) * grads[j]
    return out.sum(0)


class PCGradWeighter(Weighter):
    """Projecting conflicting gradients on `shared_params`; every other parameter gets the
    plain sum. One backward per present task (K passes instead of 1). The visiting order
    comes from (seed, step), so it is reproducible and survives a resume."""

    method = "pcgrad"

    def __init__(self, task_names: list[str], seed: int = 0):
        super().__init__(task_names)
        self.seed, self.step = int(seed), 0

    def _backward(self, present, losses, shared, scale):
        used = {n: 1.0 for _, n in present}
        if len(present) == 1 or not shared:
            _backward_total(self, _weighted_sum(present, losses, [1.0] * self.num_tasks), scale)
            return used
        prior = [p.grad for p in shared]  # gradients accumulated by earlier micro-batches
        rows = []  # per-task flattened shared gradients, float32: [K, D]
        for k, (_, n) in enumerate(present):
            for p in shared:
                p.grad = None
            (losses[n] * scale).backward(retain_graph=k < len(present) - 1)
            rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in shared]))
        combined = pcgrad_combine(torch.stack(rows), random.Random(self.seed * 1_000_003 + self.step))
        offset = 0
        for p, before in zip(shared, prior):
            piece = combined[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            p.grad = piece if before is None else before.add_(piece)  # keep accumulating
        self.step += 1
        self.last_total = sum(losses[n].detach().double() for _, n in present)
        return used

    def state_dict(self):
        return {**super().state_dict(), "seed": self.seed, "step": self.step}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.seed, self.step = int(state["seed"]), int(state["step"])
