"""The batched mixed-adapter LoRA product, shared by training, evaluation and serving.

Every row (token) of a batch may use a different adapter. Adapters are stacked:
A: [n_adapters, r, d_in], B: [n_adapters, d_out, r], with ranks padded to the largest
rank with zeros (a zero row of A and a zero column of B add nothing and get zero
gradient). An index of -1 means "no adapter" (the base model alone).

Three torch paths compute the same function:
- segmented (few distinct adapters, many tokens: training, prefill): one pair of
  matmuls per distinct adapter over its own rows. Rows of other adapters never touch an
  adapter's weights, so its gradient is exactly zero on a batch without its task.
- gathered (many distinct adapters, few tokens: decode): gather each row's A and B and
  use batched matmuls (Punica's BGMV in plain torch). Rows with -1 are masked with
  `torch.where`, never multiplied by zero, so a non-finite adapter cannot leak into them.
- masked (few adapters of small rank, training): every adapter at once as ONE pair of
  matmuls over the concatenated stacks, x @ [A_0; ...; A_n]^T -> [N, n*r], with each
  row's columns of other adapters (all of them for -1) set to zero by `torch.where`,
  then @ [B_0 | ... | B_n]^T. The two products are skinny (n*r columns), so they cost
  about the memory traffic of one adapter's; no host sync, no gather or scatter. The
  gradient of an adapter absent from the batch is still exactly zero (its columns are
  exact zeros forward and backward). Caveat: a non-finite value in some adapter's B
  reaches every row (0 * inf), so this path is for training, where the dispatch in
  `MultiLoRALinear` uses it; the isolation guarantee above holds for the other two.

The segmented path needs the distinct adapters on the host. `segment_plan` computes
them once (one device sync, or none when given a host copy of the ids); a caller running
many layers on the same ids (a model forward) passes the plan to every layer instead of
syncing per layer.

Both compute in the dtype of `x` (the caller casts x to the adapters' dtype) and return
[N, d_out] in that dtype.
"""

from __future__ import annotations

import torch

# Below this many rows, without autograd, the gathered path wins: one launch per matmul
# instead of one pair per distinct adapter (and no host sync on `unique`).
GATHER_MAX_ROWS = 64


# The masked path is used (by MultiLoRALinear, under autograd) while the concatenated
# stacks have at most this many columns (e.g. 8 adapters of rank 16).
MASKED_MAX_COLS = 128

# One entry per distinct adapter >= 0: (adapter, rows of it or None when it covers every row).
SegmentPlan = list[tuple[int, "torch.Tensor | None"]]


def segment_plan(ids: torch.Tensor, device: torch.device | None = None) -> SegmentPlan:
    """The distinct adapters of `ids` [N] and their rows, with the row indices on `device`
    (default: ids' device). Reads ids on the host: one device sync if ids live on the
    device, none if the caller passes its host copy (the rows then follow without a wait)."""
    n_rows = ids.shape[0]
    if n_rows == 0:
        return []
    device = ids.device if device is None else torch.device(device)
    adapters, counts = torch.unique(ids, return_counts=True)
    plan: SegmentPlan = []
    for adapter, count in zip(adapters.tolist(), counts.tolist()):
        if adapter < 0:
            continue
        if count == n_rows:  # the whole batch on one adapter (the multi-task case): no gather
            return [(adapter, None)]
        rows = (ids == adapter).nonzero(as_tuple=True)[0]
        plan.append((adapter, rows.to(device, non_blocking=device.type == "cuda")))
    return plan


def lora_delta_segmented(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor,
    plan: SegmentPlan | None = None,
) -> torch.Tensor:
    # x: [N, d_in], A: [n, r, d_in], B: [n, d_out, r], scaling: [n], ids: [N] -> [N, d_out]
    # plan: segment_plan(ids), when the caller already has it.
    n_rows = x.shape[0]
    out = x.new_zeros(n_rows, B.shape[1])
    if n_rows == 0:
        return out
    for adapter, rows in segment_plan(ids) if plan is None else plan:
        scale = scaling[adapter].to(x.dtype)
        if rows is None:
            return (x @ A[adapter].t()) @ B[adapter].t() * scale
        h = x.index_select(0, rows) @ A[adapter].t()  # [n_k, r]
        out = out.index_add(0, rows, (h @ B[adapter].t()) * scale)  # [N, d_out]
    return out


def adapter_column_mask(ids: torch.Tensor, n_adapters: int, r_max: int) -> torch.Tensor:
    """ids [N] -> bool [N, n_adapters * r_max]: True on the r_max columns of the row's own
    adapter (none for -1). Column j belongs to adapter j // r_max."""
    owner = torch.arange(n_adapters, device=ids.device).repeat_interleave(r_max)  # [n*r]
    return ids.unsqueeze(1) == owner.unsqueeze(0)


def lora_delta_masked(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor,
    mask: torch.Tensor | None = None, base: torch.Tensor | None = None,
) -> torch.Tensor:
    """The masked path (module docstring). mask: adapter_column_mask(ids, n, r) when the
    caller already has it. base [N, d_out] (x's dtype): returns base + delta in one fused
    matmul-add instead of delta alone."""
    n, r, d_in = A.shape
    if mask is None:
        mask = adapter_column_mask(ids, n, r)
    h = x @ A.reshape(n * r, d_in).t()  # [N, n*r]
    h = torch.where(mask, h, torch.zeros((), dtype=h.dtype, device=h.device))
    bt = (B * scaling.to(B.dtype)[:, None, None]).transpose(1, 2).reshape(n * r, B.shape[1])  # [n*r, d_out]
    if base is None:
        return h @ bt
    return torch.addmm(base, h, bt)


def gather_rows(ids: torch.Tensor, scaling: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [N] (-1 = no adapter), scaling [n_adapters] -> (each row's adapter index, clamped
    to a valid one, [N]; its scale [N, 1]; whether it has none, [N, 1] bool). One forward
    computes this once and every adapted linear reuses it (`lora_delta_rows`)."""
    safe = ids.clamp(min=0)
    return safe, scaling.index_select(0, safe).unsqueeze(-1), (ids < 0).unsqueeze(-1)


def lora_delta_rows(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, safe: torch.Tensor, scale: torch.Tensor, none: torch.Tensor
) -> torch.Tensor:
    # x: [N, d_in] and gather_rows' outputs -> [N, d_out]; rows without an adapter get
    # exactly 0, whatever the (clamped) slot they read holds (even inf / nan)
    a = A.index_select(0, safe)  # [N, r, d_in]
    b = B.index_select(0, safe)  # [N, d_out, r]
    y = torch.bmm(b, torch.bmm(a, x.unsqueeze(-1))).squeeze(-1)  # [N, d_out]
    return (y * scale.to(y.dtype)).masked_fill_(none, 0)


def lora_delta_gathered(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    # x: [N, d_in], ids: [N] -> [N, d_out]; rows with id -1 get 0
    return lora_delta_rows(x, A, B, *gather_rows(ids, scaling))


def lora_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor,
    plan: SegmentPlan | None = None,
) -> torch.Tensor:
    """x: [N, d_in], A: [n, r, d_in], B: [n, d_out, r], scaling: [n], ids: [N] (long, -1 = none)
    -> [N, d_out], the scaled LoRA update of each row under its own adapter.
    plan: segment_plan(ids), if the caller has it (used by the segmented path)."""
    if 0 < x.shape[0] <= GATHER_MAX_ROWS and not torch.is_grad_enabled():
        return lora_delta_gathered(x, A, B, scaling, ids)
    return lora_delta_segmented(x, A, B, scaling, ids, plan)


class MaskedLoRALinear(torch.autograd.Function):
    """base linear + the masked LoRA path as ONE autograd node, for training speed.

    y = x @ W^T + bias + where(mask, x @ A_flat^T, 0) @ (scaling * B)_flat^T, computed in
    x's dtype (A, B are cast from their master dtype; their gradients come back in it).
    W and bias are frozen (no gradient). The forward and backward issue the same matmuls
    as the unfused version but skip ~20 small autograd nodes per layer: training a small
    model is bound by that host-side work, not by the GPU.
    x: [..., d_in] (N rows in all), W: [d_out, d_in], bias: [d_out] or None,
    A: [n, r, d_in], B: [n, d_out, r], scaling: [n], mask: bool [N, n*r] -> [..., d_out]
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, mask):
        n, r, d_in = A.shape
        d_out = B.shape[1]
        dt = x.dtype
        a = A.reshape(n * r, d_in).to(dt)  # [nr, d_in]
        s = scaling.to(B.dtype)[:, None, None]
        b = (B * s).to(dt).transpose(1, 2).reshape(n * r, d_out)  # [nr, d_out]
        h = torch.where(mask, x.reshape(-1, d_in) @ a.t(), torch.zeros((), dtype=dt, device=x.device))  # [N, nr]
        y = torch.nn.functional.linear(x, weight, bias)  # on x's own shape, as the base layer alone would run
        y.view(-1, d_out).addmm_(h, b)
        ctx.save_for_backward(x, weight, a, b, h, mask, s)
        ctx.shapes = (n, r, d_in, d_out, A.dtype, B.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, a, b, h, mask, s = ctx.saved_tensors
        n, r, d_in, d_out, a_dtype, b_dtype = ctx.shapes
        g = g.contiguous()
        g2 = g.view(-1, d_out)
        dh = torch.where(mask, g2 @ b.t(), torch.zeros((), dtype=g.dtype, device=g.device))  # [N, nr]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = g.matmul(weight)  # [..., d_in], as the base layer's own backward
            if dx.element_size() >= 4:  # fp32/fp64: the unfused order of operations
                dx = dx + (dh @ a).view(dx.shape)
            else:  # half precision: one fp32-accumulated GEMM-add, rounded once
                dx.view(-1, d_in).addmm_(dh, a)
        dA = dB = None
        if ctx.needs_input_grad[3]:
            dA = (dh.t() @ x.reshape(-1, d_in)).reshape(n, r, d_in).to(a_dtype)
        if ctx.needs_input_grad[4]:
            db = (h.t() @ g2).reshape(n, r, d_out).transpose(1, 2)  # [n, d_out, r], grad of s * B
            dB = db.to(b_dtype) * s
        return dx, None, None, dA, dB, None, None
