"""The math of one adapted linear layer holding many LoRA adapters at once.

`MultiLoRALinear` wraps a frozen `nn.Linear` (kept as `base_layer`, the name PEFT uses)
and stacks every adapter's weights so one forward serves a batch whose rows (or tokens)
use different adapters:

    y = base(x) + scaling[k] * B[k] @ A[k] @ dropout(x)      for a token routed to k
    y = base(x)                                              for a token routed to -1

Which adapter a token uses is not an argument of `forward` (HF models would not pass it
through): every layer of a model reads one shared `AdapterRouting`, which the model
runner sets before each forward (`use_adapters` in inject.py).

Precision: adapters keep their own dtype (fp32 on a half-precision base, like PEFT). Under
`torch.autocast` the LoRA products run in the autocast dtype (as every other matmul
there; the fp32 adapters are the master weights and receive fp32 gradients); without
autocast x is cast to the adapters' dtype, as PEFT does.

Speed: under autograd with few adapters (n * r_max <= ops.MASKED_MAX_COLS) the layer
takes the masked path of ops.py (no host sync, one fused matmul-add into the base
output); otherwise the segmented / gathered paths, with the per-forward routing work
(broadcast ids, the adapter mask or the segment plan) done once per forward and shared
by every layer through the routing's cache. The segment plan needs the ids on the host:
read from the routing's host copy when the caller set one (`AdapterRouting.set`, as
`use_adapters` does with host ids), else with one device sync per forward.

Ranks may differ per adapter: the stacks are padded to the largest rank with zeros. A
padded row of A meets a zero column of B, so it adds nothing and its gradient is exactly
zero; padded entries stay zero under any optimizer whose update is zero for a zero
gradient and zero state (SGD, Adam, AdamW).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from tasktune.lora.ops import (
    GATHER_MAX_ROWS, MASKED_MAX_COLS, MaskedLoRALinear, adapter_column_mask, lora_delta, lora_delta_masked, segment_plan,
)


@dataclass
class AdapterRouting:
    """Per-forward adapter choice shared by all layers of one model.

    ids: None (base model only), a LongTensor [B] (one adapter per row, broadcast to its
    tokens) or [B, T] (one adapter per token); -1 = no adapter."""

    ids: torch.Tensor | None = None
    # Per-forward derived tensors (flat ids, masks, segment plans), valid while `ids` is
    # the same tensor at the same version; every layer of the model shares them.
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _cache_key: tuple | None = field(default=None, init=False, repr=False, compare=False)
    # (ids, its version, the same values on the CPU), from `set`
    _host: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def set(self, ids: torch.Tensor | None, host: torch.Tensor | None = None) -> None:
        """Route by `ids` (on the adapters' device); `host`: the same values on the CPU, if
        the caller has them, so that host-side planning never reads the device."""
        self.ids = ids
        self._host = (ids, ids._version, host) if ids is not None and host is not None else None

    def host_copy(self) -> torch.Tensor | None:
        """The CPU copy of `ids` given to `set`, or None (none given, or ids replaced or
        modified since)."""
        if self._host is None:
            return None
        owner, version, host = self._host
        return host if owner is self.ids and owner._version == version else None

    def cached(self, key: tuple, make):
        """make() once per (ids tensor, in-place version, capturing, key); later calls reuse it.
        Whether a CUDA graph capture is running is part of the key: a capture that found the
        eager step's tensors for the same unchanged input would read them (built from that
        batch) on every replay instead of computing its own (train/graphed_step.py), and an
        eager call after a capture must not read the capture's never-computed tensors."""
        ids = self.ids
        owner = (id(ids), ids._version if ids is not None else None, _capturing(ids))
        if self._cache_key != owner or self._cache.get("_ids") is not ids:
            self._cache = {"_ids": ids}
            self._cache_key = owner
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def _capturing(ids: torch.Tensor | None) -> bool:
    """Whether the current CUDA stream is capturing a graph (ids on a GPU only: never on the CPU)."""
    return ids is not None and ids.is_cuda and torch.cuda.is_current_stream_capturing()


def flat_token_ids(ids: torch.Tensor, lead: torch.Size, in_features: int = -1) -> torch.Tensor:
    """Broadcast routing ids [B] or [B, T] (or a scalar) to the tokens of an input whose
    shape is lead + [d_in] -> [prod(lead)], on ids' own device."""
    if ids.shape == lead:
        return ids.reshape(-1)
    if ids.dim() == 0 or (ids.dim() == 1 and len(lead) >= 1 and ids.shape[0] == lead[0]):
        return ids.reshape((-1,) + (1,) * (len(lead) - 1)).expand(lead).reshape(-1)
    raise ValueError(
        f"adapter ids of shape {tuple(ids.shape)} fit neither the rows nor the tokens of "
        f"an input of shape {tuple(lead)} + [{in_features}]"
    )


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus `n_adapters` LoRA adapters of rank <= r_max."""

    def __init__(
        self,
        base_layer: nn.Linear,
        routing: AdapterRouting,
        ranks: list[int],
        scalings: list[float],
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if len(ranks) != len(scalings) or not ranks:
            raise ValueError("need one rank and one scaling per adapter, and at least one adapter")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.routing = routing
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        weight = base_layer.weight
        if dtype is None:  # PEFT's autocast_adapter_dtype: half-precision bases get fp32 adapters
            dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        n, r_max = len(ranks), max(ranks)
        self.lora_A = nn.Parameter(torch.zeros(n, r_max, self.in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(n, self.out_features, r_max, dtype=dtype, device=weight.device))
        self.register_buffer("ranks", torch.tensor(ranks, dtype=torch.long, device=weight.device))
        self.register_buffer("scaling", torch.tensor(scalings, dtype=dtype, device=weight.device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for k in range(n):
            self.reset_adapter(k)

    @property
    def n_adapters(self) -> int:
        return self.lora_A.shape[0]

    @property
    def r_max(self) -> int:
        return self.lora_A.shape[1]

    @torch.no_grad()
    def reset_adapter(self, k: int, init_b: str = "zeros") -> None:
        """PEFT's init for slot k: A ~ kaiming_uniform(a=sqrt(5)) (nn.Linear's default),
        B = 0 so training starts from the base model. init_b="random" draws B like A
        (tests need a non-zero update)."""
        r = int(self.ranks[k])
        self.lora_A[k].zero_()
        self.lora_B[k].zero_()
        nn.init.kaiming_uniform_(self.lora_A[k, :r], a=math.sqrt(5))
        if init_b == "random":
            nn.init.kaiming_uniform_(self.lora_B[k, :, :r], a=math.sqrt(5))
        elif init_b != "zeros":
            raise ValueError(f"init_b must be 'zeros' or 'random', not {init_b!r}")

    @torch.no_grad()
    def set_adapter(self, k: int, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """Write adapter k from PEFT-shaped weights A [r, d_in], B [d_out, r] (r <= r_max);
        the padding beyond r is zeroed."""
        r = A.shape[0]
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
            raise ValueError(
                f"adapter shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a "
                f"{self.in_features}->{self.out_features} layer"
            )
        if r > self.r_max:
            raise ValueError(f"adapter rank {r} exceeds this layer's r_max {self.r_max}")
        self.lora_A[k].zero_()
        self.lora_B[k].zero_()
        self.lora_A[k, :r].copy_(A)
        self.lora_B[k, :, :r].copy_(B)
        self.ranks[k] = r
        self.scaling[k] = scaling

    @torch.no_grad()
    def clear_adapter(self, k: int) -> None:
        """Slot k leaves this layer alone (rank 0): an adapter that does not target it."""
        self.lora_A[k].zero_()
        self.lora_B[k].zero_()
        self.ranks[k] = 0
        self.scaling[k] = 0.0

    def adapter_weights(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter k without padding, detached: A [r, d_in], B [d_out, r]."""
        r = int(self.ranks[k])
        return self.lora_A[k, :r].detach(), self.lora_B[k, :, :r].detach()

    def delta_weight(self, k: int) -> torch.Tensor:
        """scaling * B @ A for adapter k: [d_out, d_in], the update merging adds to W."""
        A, B = self.adapter_weights(k)
        return (B @ A) * self.scaling[k]

    def token_ids(self, ids: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        """Broadcast routing ids to the tokens of x: lead = x.shape[:-1] -> ids [prod(lead)]."""
        return flat_token_ids(ids.to(device=self.lora_A.device, dtype=torch.long), lead, self.in_features)

    def plan_segments(self, flat_ids: torch.Tensor, lead: torch.Size):
        """ops.segment_plan for this forward, from the routing's host copy when it has one
        (no device sync), else from flat_ids (one sync)."""
        host = self.routing.host_copy()
        if host is None:
            return segment_plan(flat_ids)
        return segment_plan(flat_token_ids(host.long(), lead, self.in_features), flat_ids.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., d_in] -> [..., d_out]
        ids = self.routing.ids
        if ids is None:
            return self.base_layer(x)
        lead = x.shape[:-1]
        device = self.lora_A.device
        n, r = self.n_adapters, self.r_max
        # Under torch.compile the routing work is traced (and fused) instead of cached, and
        # every forward takes the masked path: no host sync, no Python-side state.
        compiling = torch.compiler.is_compiling()
        cached = (lambda key, make: make()) if compiling else self.routing.cached
        flat_ids = cached(("ids", lead, device), lambda: self.token_ids(ids, lead))  # [N]
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # meta: shape-only runs
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = self.lora_A.dtype
        masked = compiling or (torch.is_grad_enabled() and n * r <= MASKED_MAX_COLS)
        base = self.base_layer
        if (
            # half-precision compute only: in fp32 the one node sums a shared input's gradients
            # in another order than autograd (a few ulps), and fp32 runs are reference runs
            dtype in (torch.bfloat16, torch.float16) and not compiling
            and torch.is_grad_enabled() and n * r <= MASKED_MAX_COLS and type(base) is nn.Linear
            and isinstance(self.lora_dropout, nn.Identity) and base.weight.dtype == dtype and x.dtype == dtype
            and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
        ):  # training, one fused autograd node for base + all adapters
            mask = cached(("mask", lead, device, n, r), lambda: adapter_column_mask(flat_ids, n, r))
            return MaskedLoRALinear.apply(x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling, mask)
        y = base(x)
        A, B = self.lora_A.to(dtype), self.lora_B.to(dtype)
        x_flat = self.lora_dropout(x).reshape(-1, self.in_features).to(dtype)  # [N, d_in]
        if masked:
            mask = cached(("mask", lead, device, n, r), lambda: adapter_column_mask(flat_ids, n, r))
            if y.dtype == dtype:  # one fused y + h @ B^T
                out = lora_delta_masked(x_flat, A, B, self.scaling, flat_ids, mask, base=y.reshape(-1, self.out_features))
                return out.reshape(*lead, self.out_features)
            delta = lora_delta_masked(x_flat, A, B, self.scaling, flat_ids, mask)
        else:
            plan = None
            if x_flat.shape[0] > 0 and (torch.is_grad_enabled() or x_flat.shape[0] > GATHER_MAX_ROWS):  # segmented
                plan = cached(("plan", lead, device), lambda: self.plan_segments(flat_ids, lead))
            delta = lora_delta(x_flat, A, B, self.scaling, flat_ids, plan)  # [N, d_out]
        return y + delta.reshape(*lead, self.out_features).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={self.n_adapters}, r_max={self.r_max}"


def routing_ids(ids, index_of, count: int, device: torch.device, what: str = "adapter") -> torch.Tensor | None:
    """A user's routing choice -> LongTensor on `device`: one name or index for the whole
    batch, a list per row (names, indices, None = base) or nested per token, or a tensor
    of indices. `index_of(name)` resolves names; indices must be in -1..count-1. Ids built
    on the host reach a CUDA device without waiting for it."""
    non_blocking = torch.device(device).type == "cuda"
    if ids is None or isinstance(ids, torch.Tensor):
        return None if ids is None else ids.to(device, torch.long, non_blocking=non_blocking)

    def index(v):
        if v is None:
            return -1
        if isinstance(v, str):
            return index_of(v)
        if isinstance(v, (list, tuple)):
            return [index(u) for u in v]
        v = int(v)
        if not -1 <= v < count:
            from tasktune.errors import TasktuneError

            raise TasktuneError(f"{what} index {v} out of range (0..{count - 1}, -1 = none)")
        return v

    return torch.tensor(index(ids), dtype=torch.long).to(device, non_blocking=non_blocking)
