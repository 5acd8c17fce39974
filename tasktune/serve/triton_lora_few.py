"""Device functions of LoRA inside the fused decode linear for a batch of at most FEW
distinct adapters (triton_linear_kernel.py: FEW), the skewed case of a few popular adapters.

The launch holds G * S shrink programs (lowest ids: G the linear's modules, S parts of K)
beside its GEMM programs. Each computes, for all rows and the FEW adapters' rank rows of
one module, a dense partial h = A[slots] @ act(x) over its part of K (the same tile shapes
as a GEMM program's, so the launch's registers and shared memory do not grow), stores it
and adds 1 << 16 to every N block's split-K counter (release). The last split of an N
block to arrive, which already waits one memory round trip for the other splits'
partials, finds in the same counter whether every shrink part has landed (almost always:
they started first) and loads h's parts and the B tile with the partials. The expand is
then one more K step of its accumulator, [BLOCK_N, FEW * rank] @ [FEW * rank, rows], each
row keeping its own adapter's ranks: no tile lives across the GEMM, no extra launch, no
extra round trip. (Sessions 8-24 measured every design that held LoRA tiles across the
GEMM losing programs an SM to registers: 255 a thread against 75-139 without LoRA.)
"""
from __future__ import annotations

from tasktune.lora.triton_ops import triton

FEW = 4  # distinct adapters a FEW launch takes (the host gives their slots and each row's index)


if triton is not None:
    import triton.language as tl

    from tasktune.serve.triton_linear_blocks import dot_acc, k_partial, stores_visible

    @triton.jit
    def few_rank_rows(slots_ptr, r, R_MODULE: tl.constexpr, FEWN: tl.constexpr):
        """The FEW adapters' rank rows: each one's pool slot (-1: unused), rank index, and
        whether it is real."""
        q = tl.arange(0, FEWN * R_MODULE)
        slot = tl.load(slots_ptr + q // R_MODULE)
        jj = q % R_MODULE
        return slot, jj, (slot >= 0) & (jj < r)

    @triton.jit
    def few_shrink(pid, a_ptr, x_ptr, nw_ptr, hp_ptr, cnt_ptr, slots_ptr, offs_m, m_ok, stride_xm, r, n_blocks,
                   K: tl.constexpr, MODULES: tl.constexpr, S: tl.constexpr, R_MODULE: tl.constexpr,
                   FEWN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, KS: tl.constexpr,
                   NB_PAD: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr,
                   UPCAST: tl.constexpr):
        """Shrink program pid = (module g, part): hp[part, g] = A[slots, g's rank rows, part of
        K] @ act(x)^T, [FEWN * R_MODULE, BLOCK_M] fp32, for every row (the GEMM programs keep
        each row's own adapter's); then counted into every N block's counter."""
        g = pid // S
        part = pid % S
        slot, jj, ok = few_rank_rows(slots_ptr, r, R_MODULE, FEWN)
        rows = tl.maximum(slot, 0) * (MODULES * r) + g * r + jj  # A seen as [slots * MODULES * r, K]
        if PDL:
            tl.extra.cuda.gdc_wait()
            if EARLY:
                tl.extra.cuda.gdc_launch_dependents()
        h, _ = k_partial(a_ptr, x_ptr, nw_ptr, 0, rows, ok, offs_m, m_ok, part, stride_xm, K, FEWN * R_MODULE,
                         BLOCK_M, BLOCK_K, KS, NORM, UPCAST)
        q = tl.arange(0, FEWN * R_MODULE)
        tl.store(hp_ptr + ((part * MODULES + g) * FEWN * R_MODULE + q[:, None]) * BLOCK_M + offs_m[None, :], h)
        stores_visible(pid, UPCAST)
        nb = tl.arange(0, NB_PAD)
        tl.atomic_add(cnt_ptr + nb, 65536, mask=nb < n_blocks, sem="release")

    @triton.jit
    def few_expand(acc, hp_ptr, b_ptr, slot, jj, ok, scale, row_u, row_scale, offs_m, offs_n, n_ok, b_row0, g,
                   stride_bs, stride_bn, stride_br, MODULES: tl.constexpr, S: tl.constexpr,
                   R_MODULE: tl.constexpr, FEWN: tl.constexpr, BLOCK_M: tl.constexpr, GATHER: tl.constexpr,
                   UPCAST: tl.constexpr):
        """acc [BLOCK_N, BLOCK_M] += B[slots, b_row0 + offs_n, ranks] @ (module g's h, summed
        over the S parts in a fixed order, scaled per adapter, row m keeping only the ranks
        of its adapter row_u[m]): one tensor-core product for the FEW adapters. GATHER: load
        only each row's own ranks ([R_MODULE, BLOCK_M] a part, not FEWN times that) and
        spread them after the sum."""
        q = tl.arange(0, FEWN * R_MODULE)
        b = tl.load(b_ptr + tl.maximum(slot, 0).to(tl.int64)[None, :] * stride_bs + jj[None, :] * stride_br
                    + (b_row0 + offs_n)[:, None] * stride_bn, mask=n_ok[:, None] & ok[None, :], other=0.0)
        mine = ok[:, None] & (row_u[None, :] == (q // R_MODULE)[:, None])
        if GATHER:
            j = tl.arange(0, R_MODULE)
            at = ((g * FEWN + tl.maximum(row_u, 0)) * R_MODULE)[None, :] + j[:, None]
            hg = tl.zeros((R_MODULE, BLOCK_M), dtype=tl.float32)
            for p in tl.static_range(S):
                hg += tl.load(hp_ptr + (p * MODULES * FEWN * R_MODULE + at) * BLOCK_M + offs_m[None, :],
                              mask=(row_u >= 0)[None, :], other=0.0, cache_modifier=".cg")
            hg = (hg * row_scale[None, :]).to(b.dtype)
            h = tl.reshape(tl.broadcast_to(hg[None, :, :], (FEWN, R_MODULE, BLOCK_M)), (FEWN * R_MODULE, BLOCK_M))
            h = tl.where(mine, h, 0.0).to(b.dtype)
        else:
            h = tl.zeros((FEWN * R_MODULE, BLOCK_M), dtype=tl.float32)
            for p in tl.static_range(S):
                h += tl.load(hp_ptr + ((p * MODULES + g) * FEWN * R_MODULE + q[:, None]) * BLOCK_M + offs_m[None, :],
                             cache_modifier=".cg")
            h = tl.where(mine, h * scale[:, None], 0.0).to(b.dtype)
        return dot_acc(b, tl.trans(h), acc, UPCAST)
