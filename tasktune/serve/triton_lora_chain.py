"""LoRA carried from one fused decode launch to the next, with no launch of its own.

The BGMV pair (lora.triton_ops.lora_delta) puts two dependent launches before every fused
linear; on an H200 at 4 adapters they cost a Qwen2.5-0.5B decode step 15.7 us a layer
(~0.38 ms a step) for a few us of bytes: the cost is the hops, not the work. Here the
shrink of linear i+1 runs in linear i's epilogue, which holds a tile of exactly the values
linear i+1 will read (its output columns = the next input's K range):

    s[m, :] += scaling[slot_m] * A[slot_m][:, cols] @ act(out[m, cols])     (fp32 atomics)

and linear i+1 adds B[slot_m] @ s[m] to its accumulator inside its own launch, a tensor-core
product per chunk of the batch's distinct adapters (UCH of them), on the split programs in
turn, before its split-K sum, bias, 1 / rms (RMSNorm's scale applies to projection and LoRA
together, as triton_linear.DELTA_BEFORE_RMS), SwiGLU and residual. Its input and its s are
both its predecessor's output, so its one PDL wait covers both: nothing new on the critical
path but a few small products in each launch.

s lives in one fp32 buffer per role (the linear that reads it: qkv, o, gate_up, down) of
MAX_ROWS x S_COLS, each row holding only its own adapter's rank columns (module j of a
fused linear at columns j * r ...). Buffers start at zero and every consumer leaves them
at zero (the last of its programs to finish reading clears its rows and its counter), so no
memset runs in the step and a CUDA graph of it replays as is. The producers' atomic sums
make s's last bits depend on the order programs finish (the split-K sums of the linears
themselves stay in a fixed order). Producers: a fused linear's epilogue (o -> gate_up,
gate_up -> down, down -> the next layer's qkv) or `lora_chain_shrink`, a launch that only
shrinks a tensor (the embedding for the first qkv, attention's output for o).
"""
from __future__ import annotations

import torch

from tasktune.lora.triton_ops import MAX_RANK, _pow2_at_least, counter_buffer, pdl_launch, triton

ROLES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # the linear that reads each s buffer
MAX_ROWS = 64  # as triton_linear.MAX_ROWS
UCH = 4  # the most distinct adapters a chained batch has (more: the BGMV pair); one product takes them all
S_RA = 3 * MAX_RANK  # rank rows an adapter has in s: up to 3 modules of the largest rank
S_ROWS = UCH * S_RA
SHRINK_BLOCK_N = 64  # columns of the input a lora_chain_shrink program takes
DEBUG = 0  # bench variants of the fused linear's chain code: 1 s loads after the main loop, 2 no products,
# 3 each block's shrink atomics 16 rows further per block % 8 (wrong sums: what contention costs)


def chain_buffers(device: torch.device) -> torch.Tensor:
    """s [roles, UCH * S_RA, MAX_ROWS] fp32 on `device`: row u * S_RA + c, column m holds rank
    column c of row m's shrink when row m uses the batch's u-th distinct adapter (else 0).
    Never reallocated (CUDA graphs keep its pointer)."""
    if device.type == "cuda" and device.index is None:  # one buffer per GPU, however it is named
        device = torch.device("cuda", torch.cuda.current_device())
    s = counter_buffer("lora_chain_s", device, len(ROLES) * S_ROWS * MAX_ROWS, torch.float32)
    return s.view(len(ROLES), S_ROWS, MAX_ROWS)


if triton is not None:
    import triton.language as tl

    from tasktune.serve.triton_linear_blocks import distinct_adapters

    @triton.jit
    def chain_rows(ids_ptr, offs_m, M):
        """The rows' slots (-1: none), which rows come first for their adapter, the first rows'
        index among the batch's distinct adapters, and every row's adapter index (-1: none)."""
        ids_v, first, order = distinct_adapters(ids_ptr, offs_m, M)
        same = (ids_v[:, None] == ids_v[None, :]) & first[None, :]
        return ids_v, first, order, tl.max(tl.where(same, order[None, :], -1), axis=1)

    @triton.jit
    def adapter_rows(ids_v, first, order, u0, NU: tl.constexpr, RP: tl.constexpr):
        """Rank rows (u, j) of distinct adapters u0 .. u0 + NU - 1: each one's slot (-1 past the
        last adapter), its adapter index and its rank index j < RP."""
        u = u0 + tl.arange(0, NU)
        slot = tl.max(tl.where(first[None, :] & (order[None, :] == u[:, None]), ids_v[None, :], -1), axis=1)
        rows = tl.arange(0, NU * RP)
        return tl.reshape(tl.broadcast_to(slot[:, None], (NU, RP)), (NU * RP,)), u0 + rows // RP, rows % RP

    @triton.jit
    def _dot(a, b, acc, UPCAST: tl.constexpr):
        if UPCAST:  # the interpreter's bf16 dot is wrong (triton 3.x): fp32 there
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        return tl.dot(a, b, acc)

    @triton.jit
    def load_a(a_ptr, slot, j, ra, K, offs_n, n_ok):
        """A[slot, j, offs_n] for each rank row (a weight: loaded before the PDL wait)."""
        return tl.load(a_ptr + tl.maximum(slot, 0).to(tl.int64)[:, None] * ra * K + j[:, None] * K + offs_n[None, :],
                       mask=((slot >= 0) & (j < ra))[:, None] & n_ok[None, :], other=0.0)

    @triton.jit
    def shrink_tile(a, u, j, v, offs_m, m_ok, ids_v, urow, scale_ptr, s_ptr, ra, RA_PAD: tl.constexpr,
                    UCH: tl.constexpr, BLOCK_M: tl.constexpr, S_RA: tl.constexpr, S_M: tl.constexpr,
                    UPCAST: tl.constexpr, spread=0):
        """s[(u, j), m] += scaling[slot_m] * A[slot_u, j, cols] @ v[cols, m] where row m uses
        adapter u: this tile's share of each row's shrink. a: [UCH * RA_PAD, cols] rank rows of
        the batch's distinct adapters (load_a; u, j: each one's adapter and rank index); v
        [cols, BLOCK_M]: the consumer's input (already times its norm weight) at those columns
        of its K. Other rows' products are computed and dropped: one tensor-core product."""
        p = _dot(a, v, tl.zeros((UCH * RA_PAD, BLOCK_M), dtype=tl.float32), UPCAST)
        scale = tl.load(scale_ptr + tl.maximum(ids_v, 0), mask=ids_v >= 0, other=0.0).to(tl.float32)
        mine = (urow[None, :] == u[:, None]) & (j < ra)[:, None] & m_ok[None, :]
        tl.atomic_add(s_ptr + (u * S_RA + j + spread)[:, None] * S_M + offs_m[None, :], p * scale[None, :], mask=mine,
                      sem="relaxed")

    @triton.jit
    def load_b(b_ptr, slot, j, r, b_row0, offs_n, n_ok, stride_bs, stride_bn, stride_br):
        """B[slot, b_row0 + offs_n, j] for each rank row -> [cols, rank rows] (a weight: loaded
        before the PDL wait)."""
        return tl.load(b_ptr + tl.maximum(slot, 0).to(tl.int64)[None, :] * stride_bs + j[None, :] * stride_br
                       + (b_row0 + offs_n)[:, None] * stride_bn,
                       mask=n_ok[:, None] & ((slot >= 0) & (j < r))[None, :], other=0.0)

    @triton.jit
    def load_h(s_ptr, u, j, col0, r, offs_m, m_ok, UCH: tl.constexpr, S_RA: tl.constexpr, S_M: tl.constexpr):
        """s[(u, col0 + j), m] for each rank row (u, j) -> [rank rows, BLOCK_M]: zero where row m
        does not use adapter u (the previous launch's atomics: read from L2)."""
        return tl.load(s_ptr + (u * S_RA + col0 + j)[:, None] * S_M + offs_m[None, :],
                       mask=((j < r) & (u < UCH))[:, None] & m_ok[None, :], other=0.0, cache_modifier=".cg")

    @triton.jit
    def clear_s(s_ptr, urow, ra, offs_m, m_ok, RA_PAD: tl.constexpr, BLOCK_M: tl.constexpr, S_RA: tl.constexpr,
                S_M: tl.constexpr):
        """Zeros where rows offs_m's shrink went: the first ra rank rows of each row's adapter."""
        j = tl.arange(0, RA_PAD)
        tl.store(s_ptr + (tl.maximum(urow, 0)[None, :] * S_RA + j[:, None]) * S_M + offs_m[None, :],
                 tl.zeros((RA_PAD, BLOCK_M), tl.float32), mask=(j < ra)[:, None] & (m_ok & (urow >= 0))[None, :])

    @triton.jit
    def _lora_chain_shrink(x_ptr, nw_ptr, a_ptr, scale_ptr, ids_ptr, s_ptr, M, stride_xm, ra, K,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RA_PAD: tl.constexpr, UCH: tl.constexpr,
                           NORM: tl.constexpr, S_RA: tl.constexpr, S_M: tl.constexpr, UPCAST: tl.constexpr,
                           PDL: tl.constexpr,
                           EARLY: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < K
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        ids_v, first, order, urow = chain_rows(ids_ptr, offs_m, M)  # step inputs and weights: before the wait
        slot, u, j = adapter_rows(ids_v, first, order, 0, UCH, RA_PAD)
        a = load_a(a_ptr, slot, j, ra, K, offs_n, n_ok)
        if PDL:
            tl.extra.cuda.gdc_wait()
            if EARLY:
                tl.extra.cuda.gdc_launch_dependents()
        v = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_n[:, None], mask=n_ok[:, None] & m_ok[None, :],
                    other=0.0)
        if NORM:
            v = (v.to(tl.float32) * tl.load(nw_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]).to(v.dtype)
        shrink_tile(a, u, j, v, offs_m, m_ok, ids_v, urow, scale_ptr, s_ptr, ra, RA_PAD, UCH, BLOCK_M, S_RA, S_M,
                    UPCAST)
        if PDL and not EARLY:
            tl.extra.cuda.gdc_launch_dependents()


def check_chain(A: torch.Tensor | None, B: torch.Tensor | None, ids: torch.Tensor, rows: int) -> None:
    """What the s buffers can hold: up to MAX_ROWS rows, 3 modules of rank <= MAX_RANK."""
    ra = A.shape[1] if A is not None else B.shape[2]
    if rows > MAX_ROWS or ra > S_RA or ids.shape != (rows,) or (A is not None and not A.is_contiguous()):
        raise ValueError(f"LoRA chain: {rows} rows (<= {MAX_ROWS}), {ra} rank rows (<= {S_RA}), "
                         f"ids {tuple(ids.shape)}")


def lora_chain_shrink(x: torch.Tensor, A: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor, role: int,
                      norm_weight: torch.Tensor | None = None) -> None:
    """Adds each row's scaling * A[slot] @ act(x) to s buffer `role` (act: x, or x times the
    RMSNorm weight, whose 1 / rms the consumer applies): a producer launch for an input no
    fused linear makes. x: [M, K]; A: [slots, modules * r, K] contiguous."""
    M, K = x.shape
    check_chain(A, None, ids, M)
    if A.shape[2] != K or x.stride(1) != 1:
        raise ValueError(f"LoRA chain shrink: x {tuple(x.shape)}, A {tuple(A.shape)}")
    s = chain_buffers(x.device)
    ra = A.shape[1]
    _lora_chain_shrink[(triton.cdiv(K, SHRINK_BLOCK_N),)](
        x, norm_weight if norm_weight is not None else x, A, scaling, ids, s[role], M, x.stride(0), ra, K,
        BLOCK_M=_pow2_at_least(M, 16), BLOCK_N=SHRINK_BLOCK_N, RA_PAD=_pow2_at_least(ra, 16), UCH=UCH,
        NORM=norm_weight is not None, S_RA=S_RA, S_M=MAX_ROWS, UPCAST=x.device.type != "cuda", **pdl_launch(x.device))


@torch.library.custom_op("tasktune::lora_chain_shrink", mutates_args=())
def lora_chain_shrink_op(x: torch.Tensor, A: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor, role: int,
                         norm_weight: torch.Tensor | None = None) -> torch.Tensor:
    """`lora_chain_shrink` as an operator torch.compile keeps whole. Its output is an empty
    token the consumer takes (`after`), so the compiler keeps the launch and its order."""
    lora_chain_shrink(x, A, scaling, ids, role, norm_weight)
    return x.new_empty(0)


@lora_chain_shrink_op.register_fake
def _(x, A, scaling, ids, role, norm_weight=None):
    return x.new_empty(0)
