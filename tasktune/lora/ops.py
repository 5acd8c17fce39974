"""The batched mixed-adapter LoRA product, shared by training, evaluation and serving.

Every row (token) of a batch may use a different adapter. Adapters are stacked:
A: [n_adapters, r, d_in], B: [n_adapters, d_out, r], with ranks padded to the largest
rank with zeros (a zero row of A and a zero column of B add nothing and get zero
gradient). An index of -1 means "no adapter" (the base model alone).

Two torch paths compute the same function:
- segmented (few distinct adapters, many tokens: training, prefill): one pair of
  matmuls per distinct adapter over its own rows. Rows of other adapters never touch an
  adapter's weights, so its gradient is exactly zero on a batch without its task.
- gathered (many distinct adapters, few tokens: decode): gather each row's A and B and
  use batched matmuls (Punica's BGMV in plain torch).
"""

from __future__ import annotations

import torch


def lora_delta_segmented(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    # x: [N, d_in], ids: [N] -> [N, d_out]
    out = x.new_zeros(x.shape[0], B.shape[1])
    for adapter in torch.unique(ids).tolist():
        if adapter < 0:
            continue
        rows = (ids == adapter).nonzero(as_tuple=True)[0]
        h = x.index_select(0, rows) @ A[adapter].t()  # [n, r]
        out = out.index_add(0, rows, (h @ B[adapter].t()) * scaling[adapter])
    return out


def lora_delta_gathered(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    # x: [N, d_in], ids: [N] -> [N, d_out]
    safe = ids.clamp(min=0)
    a = A.index_select(0, safe)  # [N, r, d_in]
    b = B.index_select(0, safe)  # [N, d_out, r]
    h = torch.bmm(a, x.unsqueeze(-1))  # [N, r, 1]
    y = torch.bmm(b, h).squeeze(-1)  # [N, d_out]
    scale = scaling.index_select(0, safe) * (ids >= 0).to(scaling.dtype)
    return y * scale.unsqueeze(-1).to(y.dtype)


def lora_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """x: [N, d_in], A: [n, r, d_in], B: [n, d_out, r], scaling: [n], ids: [N] (long, -1 = none)
    -> [N, d_out], the scaled LoRA update of each row under its own adapter."""
    if x.shape[0] <= 64 and x.shape[0] > 0 and not torch.is_grad_enabled():
        return lora_delta_gathered(x, A, B, scaling, ids)
    return lora_delta_segmented(x, A, B, scaling, ids)
