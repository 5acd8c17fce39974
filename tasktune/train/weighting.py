"""Loss weighting for the multi-task adapter: how per-task losses become one gradient.

Every method has one interface, so the training loop does not know which one runs:

    weighter = make_weighter(cfg.train.weighting, task_names)
    optimizer = AdamW([*model_groups, *weighter.optimizer_param_groups()])
    used = weighter.backward({"snips": loss_a, "circa": loss_b}, shared_params, scale=1 / grad_accum)
    optimizer.step()
    weighter.end_epoch()                     # DWA in epoch mode; no-op otherwise

`backward` calls backward itself (PCGrad and GradNorm need per-task gradients), adds the
final gradients, times `scale`, to `.grad` (so gradient accumulation works as usual) and
returns the weight each present task got this step: a float, or for uncertainty's learned
weights a 0-d tensor where they live (read it when you log: reading it every step would
make the host wait for the device). Static and uncertainty never read the device; DWA and
GradNorm read each task's loss every step by design, and PCGrad's projections read too.
Pass the losses unscaled and `scale=1/grad_accum`: uncertainty's `+ s_i` term and
GradNorm's/DWA's loss ratios then mean what the papers say. A task absent from the batch
is absent from `losses`: it adds nothing and its learnable state is not touched this step.

`shared_params` are the parameters whose per-task gradients a method inspects: PCGrad
projects the gradients of exactly these (every other parameter, e.g. a task head, gets the
plain sum); GradNorm measures its gradient norms on them. Pass all the shared LoRA
weights, or for GradNorm just the last shared layer's, as the paper does: the K extra
backward passes then stop at that layer and cost little. Static, uncertainty and DWA
ignore them.

Learnable state and who steps it:
- uncertainty's log-variances are part of the objective: make them where the losses live
  (`make_weighter(..., device=)`: no copy back to the host in every backward) and put
  `weighter.optimizer_param_groups()` into the main optimizer (its lr schedule applies;
  checkpoints then hold their Adam state with the optimizer's).
- GradNorm's task weights are trained by their own loss, not the model's: the weighter
  steps them itself (Adam, inside `backward`) and renormalises them to sum to K. They
  never get a `.grad`, so an optimizer that holds them by mistake leaves them alone.
`weighter.parameters()` lists both kinds; `steps_itself` says which.

`state_dict()` is JSON-safe (small float32 vectors as lists of floats, which round-trip
exactly through JSON): store it in the checkpoint's `extra`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter

from tasktune.config import WeightingConfig
from tasktune.errors import TasktuneError


class Weighter:
    """The common interface; subclasses implement `_backward` for the tasks present."""

    method = "base"
    steps_itself = True  # False: its parameters() belong in the main optimizer

    def __init__(self, task_names: list[str]):
        if not task_names:
            raise TasktuneError("loss weighting needs at least one task")
        if len(set(task_names)) != len(task_names):
            raise TasktuneError(f"task names repeat: {task_names}")
        self.task_names = list(task_names)
        self.index = {name: i for i, name in enumerate(task_names)}
        self.last_total: Tensor | None = None  # the combined objective of the last step, unread

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def last_loss(self) -> float | None:
        """The combined objective of the last step, read from the device now (a sync)."""
        return None if self.last_total is None else float(self.last_total)

    def backward(
        self, losses: dict[str, Tensor], shared_params: list[Parameter], scale: float = 1.0
    ) -> dict[str, float | Tensor]:
        """Backpropagate `scale` x the combined objective; return {task: weight used}."""
        unknown = [n for n in losses if n not in self.index]
        if unknown:
            raise ValueError(f"losses for unknown task(s) {unknown}; the weighter knows {self.task_names}")
        present = [(i, n) for i, n in enumerate(self.task_names) if n in losses]
        if not present:
            return {}
        return self._backward(present, losses, list(shared_params), float(scale))

    def _backward(
        self, present: list[tuple[int, str]], losses: dict[str, Tensor], shared: list[Parameter], scale: float
    ) -> dict[str, float | Tensor]:
        raise NotImplementedError

    def parameters(self) -> list[Tensor]:
        return []

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """Param groups to append to the main optimizer (empty unless steps_itself is False)."""
        return []

    def end_epoch(self, mean_losses: dict[str, float] | None = None) -> None:
        """Close an epoch. Only DWA (in epoch mode) uses it."""

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "task_names": self.task_names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.method or state.get("task_names") != self.task_names:
            saved = f"{state.get('method')} over {state.get('task_names')}"
            raise TasktuneError(f"the checkpoint's loss weighting is {saved}, this run's is {self.method} over {self.task_names}")


def _weighted_sum(present: list[tuple[int, str]], losses: dict[str, Tensor], weights: list[float]) -> Tensor:
    return sum(weights[i] * losses[n] for i, n in present)  # type: ignore[return-value]


def _backward_total(weighter: Weighter, total: Tensor, scale: float) -> None:
    (total * scale).backward()
    weighter.last_total = total.detach()


class StaticWeighter(Weighter):
    """L = sum_i w_i L_i with fixed w_i."""

    method = "static"

    def __init__(self, task_names: list[str], weights: list[float]):
        super().__init__(task_names)
        self.weights = [float(w) for w in weights]

    def _backward(self, present, losses, shared, scale):
        _backward_total(self, _weighted_sum(present, losses, self.weights), scale)
        return {n: self.weights[i] for i, n in present}


class UncertaintyWeighter(Weighter):
    """Kendall, Gal & Cipolla (2018): L = sum_i exp(-s_i) L_i + s_i, s_i = log sigma_i^2 learnable.

    We use this one form for every task kind (as LibMTL and most re-implementations do).
    The paper's regression form is 1/(2 sigma^2) L + log sigma = (exp(-s) L + s) / 2, i.e.
    ours times 1/2; its classification form is exp(-s) L + s/2. Ours drives every task to
    exp(-s_i) = 1 / L_i at the optimum, whatever its kind. s_i start at 0 (weight 1).
    """

    method = "uncertainty"
    steps_itself = False

    def __init__(self, task_names: list[str], device: torch.device | str | None = None):
        super().__init__(task_names)
        self.log_vars = Parameter(torch.zeros(len(task_names), device=device))  # s: [K]

    def _backward(self, present, losses, shared, scale):
        terms = []
        for i, n in present:
            loss = losses[n]
            s = self.log_vars[i].to(loss.device)  # differentiable copy if the loss lives on GPU
            terms.append(torch.exp(-s) * loss + s)
        _backward_total(self, torch.stack(terms).sum(), scale)
        weights = torch.exp(-self.log_vars.detach())  # [K], where log_vars live: not read here
        return {n: weights[i] for i, n in present}

    def parameters(self) -> list[Tensor]:
        return [self.log_vars]

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.log_vars], "weight_decay": 0.0}]

    def state_dict(self):
        return {**super().state_dict(), "log_vars": self.log_vars.detach().float().tolist()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        with torch.no_grad():  # in place: the optimizer keeps pointing at the same Parameter
            self.log_vars.copy_(torch.tensor(state["log_vars"], dtype=torch.float32))


def dwa_weights(history: list[list[float | None]], temperature: float) -> list[float]:
    """Liu, Johns & Davison (2019): weights for the next period from per-period mean losses.

    `history[t][i]` is task i's mean loss in period t (None: the task never appeared).
    w_i = K exp(r_i / T) / sum_j exp(r_j / T) with r_i = L_i(t-1) / L_i(t-2); all 1 until two
    periods are complete. A task missing from either period gets the neutral r_i = 1.
    """
    k = len(history[-1]) if history else 0
    if len(history) < 2:
        return [1.0] * k
    last, before = history[-1], history[-2]
    ratios = [a / b if a is not None and b is not None and b > 0 else 1.0 for a, b in zip(last, before)]
    top = max(ratios) / temperature
    e = [math.exp(r / temperature - top) for r in ratios]
    return [len(e) * v / sum(e) for v in e]


class DWAWeighter(Weighter):
    """Dynamic weight average. A period is an epoch (`window=0`: closed by `end_epoch`) or
    `window` calls of `backward` (closed automatically; `end_epoch` is then ignored).
    Short runs (one epoch) need the window: with epochs they would never leave weight 1.
    A period's mean loss is the mean of the losses `backward` saw, unless `end_epoch` is
    given the means (e.g. computed on a held-out pass)."""

    method = "dwa"

    def __init__(self, task_names: list[str], temperature: float, window: int = 0):
        super().__init__(task_names)
        if temperature <= 0:
            raise TasktuneError(f"dwa_temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.window = int(window)
        self.history: list[list[float | None]] = []  # the last two periods' mean losses
        self.weights = [1.0] * self.num_tasks
        self._sums, self._counts, self._steps = [0.0] * self.num_tasks, [0] * self.num_tasks, 0

    def _backward(self, present, losses, shared, scale):
        used = {n: self.weights[i] for i, n in present}
        _backward_total(self, _weighted_sum(present, losses, self.weights), scale)
        for i, n in present:
            self._sums[i] += float(losses[n].detach())
            self._counts[i] += 1
        self._steps += 1
        if self.window and self._steps % self.window == 0:
            self._close_period(None)
        return used

    def end_epoch(self, mean_losses=None):
        if not self.window:
            self._close_period(mean_losses)

    def _close_period(self, mean_losses: dict[str, float] | None) -> None:
        if mean_losses is None:
            means = [s / c if c else None for s, c in zip(self._sums, self._counts)]
        else:
            unknown = [n for n in mean_losses if n not in self.index]
            if unknown:
                raise ValueError(f"mean losses for unknown task(s) {unknown}")
            means = [mean_losses.get(n) for n in self.task_names]
        self.history = (self.history + [means])[-2:]
        self.weights = dwa_weights(self.history, self.temperature)
        self._sums, self._counts = [0.0] * self.num_tasks, [0] * self.num_tasks

    def state_dict(self):
        extra = {"history": self.history, "weights": self.weights, "sums": self._sums, "counts": self._counts}
        return {**super().state_dict(), **extra, "steps": self._steps}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.history = [list(p) for p in state["history"]]
        self.weights = list(state["weights"])
        self._sums, self._counts, self._steps = list(state["sums"]), list(state["counts"]), state["steps"]


def make_weighter(
    cfg: WeightingConfig, task_names: list[str], *, task_weights: dict[str, float] | None = None,
    seed: int = 0, dwa_window: int = 0, gradnorm_lr: float = 0.025, device: torch.device | str | None = None,
) -> Weighter:
    """The weighter `cfg.method` names. `cfg.weights` (static only) override `task_weights`
    (e.g. each TaskEntry.weight), which override 1.0; a name that is not a task is an error.
    `dwa_window` > 0 makes DWA's period that many steps instead of an epoch. `device`: where
    uncertainty's learnable log-variances live (the losses' device)."""
    for source, mapping in (("weighting.weights", cfg.weights), ("task weights", task_weights)):
        for name, value in (mapping or {}).items():
            if name not in task_names:
                raise TasktuneError(f"{source} names unknown task '{name}' (tasks: {', '.join(task_names)})")
            if not (value >= 0 and math.isfinite(value)):
                raise TasktuneError(f"{source}: weight of '{name}' must be a finite number >= 0, got {value}")
    if cfg.method == "static":
        merged = {**(task_weights or {}), **(cfg.weights or {})}
        return StaticWeighter(task_names, [merged.get(n, 1.0) for n in task_names])
    if cfg.method == "uncertainty":
        return UncertaintyWeighter(task_names, device)
    if cfg.method == "dwa":
        return DWAWeighter(task_names, cfg.dwa_temperature, window=dwa_window)
    from tasktune.train.gradient_weighting import GradNormWeighter, PCGradWeighter  # they build on Weighter

    if cfg.method == "gradnorm":
        return GradNormWeighter(task_names, cfg.gradnorm_alpha, lr=gradnorm_lr)
    if cfg.method == "pcgrad":
        return PCGradWeighter(task_names, seed=seed)
    raise TasktuneError(f"unknown loss weighting method '{cfg.method}'")
