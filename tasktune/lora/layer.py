"""The math of one adapted linear layer holding many LoRA adapters at once.

`MultiLoRALinear` wraps a frozen `nn.Linear` (kept as `base_layer`, the name PEFT uses)
and stacks every adapter's weights so one forward serves a batch whose rows (or tokens)
use different adapters:

    y = base(x) + scaling[k] * B[k] @ A[k] @ dropout(x)      for a token routed to k
    y = base(x)                                              for a token routed to -1

Which adapter a token uses is not an argument of `forward` (HF models would not pass it
through): every layer of a model reads one shared `AdapterRouting`, which the model
runner sets before each forward (`use_adapters` in inject.py).

Ranks may differ per adapter: the stacks are padded to the largest rank with zeros. A
padded row of A meets a zero column of B, so it adds nothing and its gradient is exactly
zero; padded entries stay zero under any optimizer whose update is zero for a zero
gradient and zero state (SGD, Adam, AdamW).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tasktune.lora.ops import lora_delta


@dataclass
class AdapterRouting:
    """Per-forward adapter choice shared by all layers of one model.

    ids: None (base model only), a LongTensor [B] (one adapter per row, broadcast to its
    tokens) or [B, T] (one adapter per token); -1 = no adapter."""

    ids: torch.Tensor | None = None


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
        ids = ids.to(device=self.lora_A.device, dtype=torch.long)
        if ids.shape == lead:
            return ids.reshape(-1)
        if ids.dim() == 0 or (ids.dim() == 1 and len(lead) >= 1 and ids.shape[0] == lead[0]):
            return ids.reshape((-1,) + (1,) * (len(lead) - 1)).expand(lead).reshape(-1)
        raise ValueError(
            f"adapter ids of shape {tuple(ids.shape)} fit neither the rows nor the tokens of "
            f"an input of shape {tuple(lead)} + [{self.in_features}]"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., d_in] -> [..., d_out]
        y = self.base_layer(x)
        ids = self.routing.ids
        if ids is None:
            return y
        lead = x.shape[:-1]
        flat_ids = self.token_ids(ids, lead)  # [N]
        x_flat = self.lora_dropout(x).reshape(-1, self.in_features).to(self.lora_A.dtype)  # [N, d_in]
        delta = lora_delta(x_flat, self.lora_A, self.lora_B, self.scaling, flat_ids)  # [N, d_out]
        return y + delta.reshape(*lead, self.out_features).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={self.n_adapters}, r_max={self.r_max}"
