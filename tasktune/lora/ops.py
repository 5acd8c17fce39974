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
  use batched matmuls (Punica's BGMV in plain torch). Rows with -1 are masked with
  `torch.where`, never multiplied by zero, so a non-finite adapter cannot leak into them.

Both compute in the dtype of `x` (the caller casts x to the adapters' dtype) and return
[N, d_out] in that dtype.
"""

from __future__ import annotations

import torch

# Below this many rows, without autograd, the gathered path wins: one launch per matmul
# instead of one pair per distinct adapter (and no host sync on `unique`).
GATHER_MAX_ROWS = 64


def lora_delta_segmented(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    # x: [N, d_in], A: [n, r, d_in], B: [n, d_out, r], scaling: [n], ids: [N] -> [N, d_out]
    n_rows = x.shape[0]
    out = x.new_zeros(n_rows, B.shape[1])
    if n_rows == 0:
        return out
    adapters, counts = torch.unique(ids, return_counts=True)
    for adapter, count in zip(adapters.tolist(), counts.tolist()):
        if adapter < 0:
            continue
        scale = scaling[adapter].to(x.dtype)
        if count == n_rows:  # the whole batch on one adapter (the multi-task case): no gather
            return (x @ A[adapter].t()) @ B[adapter].t() * scale
        rows = (ids == adapter).nonzero(as_tuple=True)[0]
        h = x.index_select(0, rows) @ A[adapter].t()  # [n_k, r]
        out = out.index_add(0, rows, (h @ B[adapter].t()) * scale)  # [N, d_out]
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
    y = y * scaling.index_select(0, safe).to(y.dtype).unsqueeze(-1)
    return torch.where((ids >= 0).unsqueeze(-1), y, torch.zeros((), dtype=y.dtype, device=y.device))


def lora_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """x: [N, d_in], A: [n, r, d_in], B: [n, d_out, r], scaling: [n], ids: [N] (long, -1 = none)
    -> [N, d_out], the scaled LoRA update of each row under its own adapter."""
    if 0 < x.shape[0] <= GATHER_MAX_ROWS and not torch.is_grad_enabled():
        return lora_delta_gathered(x, A, B, scaling, ids)
    return lora_delta_segmented(x, A, B, scaling, ids)
