"""CGC-LoRA: task-common and task-specific LoRA experts mixed by a per-task gate.

Customized Gate Control (CGC, Tang et al. 2020, "Progressive Layered Extraction") applied
to LoRA (Song et al. 2024, CGC-LoRA). Each adapted linear layer holds

    k_c common experts, shared by every task, and
    k_s specific experts per task, used by that task only,

each a LoRA pair A_e [r_e, d_in], B_e [d_out, r_e]. A token of task t gets

    y = base(x) + scaling * sum_{e in E_t} g_{t,e} * B_e @ A_e @ dropout(x)
    g_t = softmax over E_t (= the common experts + t's own experts) of the gate logits

The gate logits are a learned vector per task (the task-motivated gate of CGC-LoRA, the
default), so each task's mixture is a fixed LoRA of rank |E_t| * r_e and can be folded
into one plain PEFT adapter for serving (fold.py). `input_gate=True` is the ablation
with an input-dependent gate: logits = task vector + W_t @ x, computed per token (the
layer does not see the attention mask, so a mean over tokens would mix in padding); W_t
starts at zero, so training starts from the task gate. It cannot be folded.

Budget: by default r_e = r // (k_c + k_s) (`cgc_ranks`), so a task's folded adapter has
the rank r of the plain LoRA it is compared with, and scaling = alpha / (|E_t| * r_e),
PEFT's alpha / r for that rank. Trainable parameters of one layer:

    (k_c + T * k_s) * r_e * (d_in + d_out)   experts
  + T * (k_c + k_s)                          gate logits
  + T * (k_c + k_s) * d_in                   input gate only

and what one task's predictions depend on: (k_c + k_s) * r_e * (d_in + d_out) + (k_c + k_s),
i.e. plain LoRA of rank r plus k_c + k_s gate logits when r is divisible.

Routing is the `AdapterRouting` of layer.py, with task indices for adapter slots: ids per
row [B] or per token [B, T], -1 = base model. `use_tasks` sets it around a forward.
Init is PEFT's: A kaiming-uniform(a=sqrt(5)), B = 0 (training starts from the base
model); gate logits 0 (uniform gate).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tasktune.errors import TasktuneError
from tasktune.lora.layer import AdapterRouting, MultiLoRALinear, routing_ids
from tasktune.lora.targets import default_targets, match_targets


def cgc_ranks(total_rank: int, k_common: int, k_specific: int) -> int:
    """The rank of every expert so that a task's experts (k_c common + k_s own) add up to
    `total_rank`, the rank of the plain LoRA CGC is compared with. Rounds down when
    total_rank is not a multiple of k_c + k_s (the task's rank is then a little below)."""
    if k_common < 0 or k_specific < 0 or k_common + k_specific == 0:
        raise TasktuneError(
            f"CGC needs k_common, k_specific >= 0 and at least one expert, got {k_common}, {k_specific}"
        )
    r_e = total_rank // (k_common + k_specific)
    if r_e < 1:
        raise TasktuneError(
            f"rank {total_rank} is too small for {k_common} common + {k_specific} specific experts of rank >= 1"
        )
    return r_e


def _token_ids(ids: torch.Tensor, lead: torch.Size, device: torch.device) -> torch.Tensor:
    """Routing ids [B] (per row), [B, T] (per token) or [] -> one per token of x: [prod(lead)]."""
    ids = ids.to(device=device, dtype=torch.long)
    if ids.shape == lead:
        return ids.reshape(-1)
    if ids.dim() == 0 or (ids.dim() == 1 and len(lead) >= 1 and ids.shape[0] == lead[0]):
        return ids.reshape((-1,) + (1,) * (len(lead) - 1)).expand(lead).reshape(-1)
    raise TasktuneError(f"task ids of shape {tuple(ids.shape)} fit neither the rows nor the tokens of {tuple(lead)}")


class CGCLoRALinear(nn.Module):
    """A frozen nn.Linear plus the common and task-specific LoRA experts of `task_names`.

    Experts are stacked: slots 0..k_c-1 are common, then k_s slots per task in task order.
    lora_A [E, r_e, d_in], lora_B [E, d_out, r_e], gate_logits [T, k_c + k_s] (over the
    task's allowed experts, common first), gate_proj [T, k_c + k_s, d_in] (input gate)."""

    def __init__(
        self,
        base: nn.Linear,
        task_names: Sequence[str],
        k_common: int,
        k_specific: int,
        expert_rank: int,
        alpha: float,
        dropout: float = 0.0,
        input_gate: bool = False,
        routing: AdapterRouting | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not task_names or len(set(task_names)) != len(task_names):
            raise TasktuneError(f"CGC task names must be non-empty and distinct, got {list(task_names)}")
        cgc_ranks(expert_rank * (k_common + k_specific), k_common, k_specific)  # validates the counts
        self.base_layer = base
        base.requires_grad_(False)
        self.routing = routing if routing is not None else AdapterRouting()
        self.task_names = tuple(task_names)
        self.k_common, self.k_specific, self.expert_rank = k_common, k_specific, expert_rank
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = alpha / (expert_rank * (k_common + k_specific))  # PEFT's alpha / r of the task's rank
        weight = base.weight
        if dtype is None:  # as MultiLoRALinear: half-precision bases get fp32 adapters
            dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        T, K, E = len(task_names), k_common + k_specific, k_common + len(task_names) * k_specific
        kw = dict(dtype=dtype, device=weight.device)
        self.lora_A = nn.Parameter(torch.empty(E, expert_rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(E, self.out_features, expert_rank, **kw))
        self.gate_logits = nn.Parameter(torch.zeros(T, K, **kw))
        self.gate_proj = nn.Parameter(torch.zeros(T, K, self.in_features, **kw)) if input_gate else None
        allowed = [list(range(k_common)) + [k_common + t * k_specific + j for j in range(k_specific)] for t in range(T)]
        self.register_buffer("allowed", torch.tensor(allowed, dtype=torch.long, device=weight.device), persistent=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            for e in range(E):
                nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))

    @property
    def n_experts(self) -> int:
        return self.lora_A.shape[0]

    @property
    def input_gate(self) -> bool:
        return self.gate_proj is not None

    def task_gates(self) -> torch.Tensor:
        """softmax of each task's logit vector: [T, k_c + k_s], common experts first. For an
        input-gated layer this is the gate at W_t x = 0 (the input-independent part)."""
        return torch.softmax(self.gate_logits.float(), dim=-1)

    def gate_table(self) -> torch.Tensor:
        """Task gates spread over all experts: [T, E], zero outside common + own experts."""
        g = self.task_gates()
        return g.new_zeros(g.shape[0], self.n_experts).scatter(1, self.allowed, g)

    def token_gates(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """ids: [N] task index (-1 = none), x: [N, d_in] -> gates [N, E] (fp32); a row of
        -1 is all zeros. Other tasks' specific experts always get an exact 0, so they
        receive exactly zero gradient from this token."""
        valid = ids >= 0
        t = ids.clamp(min=0)
        if self.gate_proj is None:
            gates = self.gate_table()[t]  # [N, E]
        else:
            T, K = self.gate_logits.shape
            proj = (x @ self.gate_proj.to(x.dtype).reshape(T * K, -1).T).reshape(-1, T, K)  # [N, T, K]
            own = proj.gather(1, t.view(-1, 1, 1).expand(-1, 1, K)).squeeze(1)  # [N, K]
            g = torch.softmax(self.gate_logits.float()[t] + own.float(), dim=-1)  # [N, K]
            gates = g.new_zeros(g.shape[0], self.n_experts).scatter(1, self.allowed[t], g)
        return gates * valid.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., d_in], routing ids [B] or [B, T] -> [..., d_out]
        ids = self.routing.ids
        y = self.base_layer(x)
        if ids is None:
            return y
        lead = x.shape[:-1]
        device = self.lora_A.device
        cached = (lambda key, make: make()) if torch.compiler.is_compiling() else self.routing.cached  # as layer.py
        flat_ids = cached(("ids", lead, device), lambda: _token_ids(ids, lead, device))  # [N]
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = self.lora_A.dtype
        E, r = self.n_experts, self.expert_rank
        x_flat = x.reshape(-1, self.in_features).to(dtype)  # [N, d_in]
        gates = self.token_gates(flat_ids, x_flat)  # [N, E]
        # All experts as one LoRA of rank E * r: columns e*r..e*r+r-1 belong to expert e.
        A = self.lora_A.to(dtype).reshape(E * r, self.in_features)  # [E*r, d_in]
        B = self.lora_B.to(dtype).permute(1, 0, 2).reshape(self.out_features, E * r)  # [d_out, E*r]
        h = self.lora_dropout(x_flat) @ A.T  # [N, E*r]
        h = h * gates.to(dtype).repeat_interleave(r, dim=1)
        delta = (h @ B.T) * self.scaling  # [N, d_out]
        return y + delta.reshape(*lead, self.out_features).to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, tasks={len(self.task_names)}, "
            f"k_common={self.k_common}, k_specific={self.k_specific}, expert_rank={self.expert_rank}, "
            f"input_gate={self.input_gate}"
        )


@dataclass(frozen=True)
class CGCSpec:
    """What a CGC model was created with. r: the plain-LoRA rank it is compared with."""

    r: int
    alpha: float
    k_common: int
    k_specific: int
    expert_rank: int
    dropout: float = 0.0
    input_gate: bool = False
    target_modules: tuple[str, ...] | str = ()

    @property
    def task_rank(self) -> int:
        """Rank of one task's mixture, its folded adapter's r."""
        return self.expert_rank * (self.k_common + self.k_specific)

    @property
    def scaling(self) -> float:
        return self.alpha / self.task_rank


@dataclass
class CGCHandle:
    """The CGC layers of one model by task name. tasks: name -> index; layers: path -> layer."""

    tasks: dict[str, int]
    layers: dict[str, CGCLoRALinear]
    routing: AdapterRouting
    spec: CGCSpec

    def index(self, task: str) -> int:
        if task not in self.tasks:
            raise TasktuneError(f"unknown CGC task {task!r}; known tasks: {', '.join(self.tasks)}")
        return self.tasks[task]

    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).lora_A.device

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable CGC Parameter (experts, gate logits, input gates): the optimizer's."""
        return [p for layer in self.layers.values() for p in layer.parameters() if p.requires_grad]

    def expert_labels(self) -> list[str]:
        """Names of the entries of a task's gate vector, in gate_weights() order."""
        s = self.spec
        return [f"common{i}" for i in range(s.k_common)] + [f"specific{j}" for j in range(s.k_specific)]

    @torch.no_grad()
    def gate_weights(self) -> dict[str, dict[str, list[float]]]:
        """{layer path: {task: gate over expert_labels()}} for the report's heatmap (the
        input-independent part for an input-gated model)."""
        out: dict[str, dict[str, list[float]]] = {}
        for path, layer in self.layers.items():
            gates = layer.task_gates()  # [T, k_c + k_s]
            out[path] = {t: gates[k].tolist() for t, k in self.tasks.items()}
        return out

    def trainable_parameter_count(self, task: str | None = None) -> int:
        """All CGC parameters, or those one task's predictions depend on (common experts,
        its own experts and its own gate row)."""
        if task is None:
            return sum(p.numel() for p in self.parameters())
        self.index(task)
        s = self.spec
        k = s.k_common + s.k_specific
        n = 0
        for layer in self.layers.values():
            n += k * s.expert_rank * (layer.in_features + layer.out_features) + k
            n += k * layer.in_features if layer.input_gate else 0
        return n

    def ids_tensor(self, ids: int | str | None | Sequence | torch.Tensor) -> torch.Tensor | None:
        """Task choice -> LongTensor on the experts' device (see `routing_ids`)."""
        return routing_ids(ids, self.index, len(self.tasks), self.device, "task")


def inject_cgc(
    model: nn.Module,
    task_names: list[str],
    *,
    r: int,
    alpha: float,
    k_common: int = 1,
    k_specific: int = 1,
    target_modules: list[str] | str | None = None,
    dropout: float = 0.0,
    input_gate: bool = False,
    expert_rank: int | None = None,
) -> CGCHandle:
    """Replace each targeted nn.Linear (targets.match_targets, as inject_lora) by a
    CGCLoRALinear for `task_names`, freeze the rest of the model, return the handle.
    expert_rank defaults to cgc_ranks(r, k_common, k_specific). Init draws from torch's
    global RNG: seed before calling."""
    if any(isinstance(m, (CGCLoRALinear, MultiLoRALinear)) for m in model.modules()):
        raise TasktuneError("this model already has LoRA layers; inject CGC into a fresh base model")
    r_e = expert_rank if expert_rank is not None else cgc_ranks(r, k_common, k_specific)
    paths = match_targets(model, target_modules)
    if target_modules is None:
        targets: tuple[str, ...] | str = tuple(
            t for t in default_targets(model) if any(p == t or p.endswith("." + t) for p in paths)
        )
    else:
        targets = target_modules if isinstance(target_modules, str) else tuple(target_modules)
    spec = CGCSpec(r, alpha, k_common, k_specific, r_e, dropout, input_gate, targets)
    model.requires_grad_(False)
    routing = AdapterRouting()
    layers: dict[str, CGCLoRALinear] = {}
    for path in paths:
        wrapped = CGCLoRALinear(
            model.get_submodule(path), task_names, k_common, k_specific, r_e, alpha, dropout, input_gate, routing
        )
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, wrapped)
        layers[path] = wrapped
    return CGCHandle({t: i for i, t in enumerate(task_names)}, layers, routing, spec)


@contextmanager
def use_tasks(handle: CGCHandle, ids: int | str | None | Sequence | torch.Tensor) -> Iterator[None]:
    """Route the forwards inside the block to tasks: per row [B], per token [B, T], or one
    task for everything; -1 / None = base model. Restores the previous routing on exit."""
    previous = handle.routing.ids
    handle.routing.ids = handle.ids_tensor(ids)
    try:
        yield
    finally:
        handle.routing.ids = previous
