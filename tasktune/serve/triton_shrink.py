"""A LoRA shrink by itself, into the per-row h that `decode_linear(..., h=)` expands.

The chained decode path computes each linear's shrink in the epilogue of the launch that
produces its input (`decode_linear(..., shrink_next=)`), so the linear itself only expands.
Where the input comes from elsewhere (the embeddings before the first layer, attention
before o) this launch does it: one program per K block of x, each adding its part of
A[slot] @ norm(x)^T for the batch's distinct adapters into h with fp32 atomics.
"""
from __future__ import annotations

import torch

from tasktune.lora import triton_ops
from tasktune.lora.triton_ops import _pow2_at_least, triton

if triton is not None:
    import triton.language as tl

    from tasktune.serve.triton_linear_blocks import chunk_slots, distinct_adapters
    from tasktune.serve.triton_lora_rows import a_chunk, shrink_rows

    @triton.jit
    def _shrink_rows_kernel(x_ptr, a_ptr, nw_ptr, ids_ptr, h_ptr, M, stride_xm, K, ra,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RA_PAD: tl.constexpr, U: tl.constexpr,
                            NORM: tl.constexpr,
                            UPCAST: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        ids_v, first, order = distinct_adapters(ids_ptr, offs_m, M)  # the step's inputs: before the wait
        slot, jj = chunk_slots(ids_v, first, order, 0, U, RA_PAD)
        ptrs, ok = a_chunk(a_ptr, slot, jj, ra, K, offs_k, k_ok)
        a0 = tl.load(ptrs, mask=ok, other=0.0)  # weights too
        if PDL:
            tl.extra.cuda.gdc_wait()
            if EARLY:
                tl.extra.cuda.gdc_launch_dependents()
        act = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None], mask=k_ok[:, None] & m_ok[None, :],
                      other=0.0)  # [BLOCK_K, BLOCK_M]
        shrink_rows(h_ptr, a_ptr, a0, slot, nw_ptr, act, offs_k, k_ok, ids_v, first, order, offs_m, m_ok, K, ra, RA_PAD,
                    BLOCK_M, U, NORM, UPCAST)
        if PDL and not EARLY:
            tl.extra.cuda.gdc_launch_dependents()


def lora_shrink_rows(x: torch.Tensor, A: torch.Tensor, ids: torch.Tensor, h: torch.Tensor,
                     norm_weight: torch.Tensor | None = None, block_k: int = 64) -> torch.Tensor:
    """h[m] += A[ids[m]] @ (x[m] * norm_weight), fp32, for rows with an adapter (ids >= 0).
    x: [M, K] (rows contiguous); A: [slots, ra, K] contiguous; h: [M, ra] fp32 contiguous,
    zeroed by the caller; norm_weight: an RMSNorm's weight (the 1 / rms is the reader's)."""
    M, K = x.shape
    ra = A.shape[1]
    if (A.dim() != 3 or A.shape[2] != K or not A.is_contiguous() or x.stride(1) != 1 or ids.shape != (M,)
            or h.shape != (M, ra) or h.dtype != torch.float32 or not h.is_contiguous()
            or (norm_weight is not None and norm_weight.shape != (K,))):
        raise ValueError(f"lora_shrink_rows: x {tuple(x.shape)}, A {tuple(A.shape)}, ids {tuple(ids.shape)}, "
                         f"h {tuple(h.shape)} {h.dtype}")
    launch = triton_ops.pdl_launch(x.device)
    _shrink_rows_kernel[(triton.cdiv(K, block_k),)](
        x, A, norm_weight if norm_weight is not None else x, ids, h, M, x.stride(0), K, ra,
        BLOCK_M=_pow2_at_least(M, 16), BLOCK_K=block_k, RA_PAD=_pow2_at_least(ra, 16), U=4,
        NORM=norm_weight is not None,
        UPCAST=x.device.type != "cuda", num_warps=4, **launch)
    return h
