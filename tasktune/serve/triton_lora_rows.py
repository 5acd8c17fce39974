"""Device functions of LoRA split across two launches (triton_linear_kernel.py: SHRINK_NEXT, H_ROWS).

The launch that produces a linear's input adds that linear's shrink of the columns it
stores into a per-row h (fp32 atomics, [M, modules * r]); the kernel boundary is the only
sync the sum needs. The linear then expands h. Up to U distinct adapters share one load
and one tensor-core product (their A rows, or B columns, stacked), so LoRA costs one memory
latency a launch, not one an adapter; the weights' loads are issued before the launch waits
for its predecessor (PDL), so even that latency mostly hides.
"""
from __future__ import annotations

from tasktune.lora.triton_ops import triton

if triton is not None:
    import triton.language as tl

    from tasktune.serve.triton_linear_blocks import chunk_slots, dot_acc

    @triton.jit
    def prefetch_l2(ptrs, ok, INTERPRETED: tl.constexpr):
        """Ask L2 for the lines at ptrs (where ok): a later load of them waits on L2, not HBM."""
        if not INTERPRETED:
            tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; "
                                      "mov.u32 $0, 0; }", "=r,l,r", [ptrs, ok.to(tl.int32)], dtype=tl.int32,
                                      is_pure=False, pack=1)

    @triton.jit
    def a_chunk(a_ptr, slot, jj, ra, K, offs_k, k_ok):
        """Pointers and mask of the A rows (slot, jj) at columns offs_k: [U * RA_PAD, len(offs_k)]
        of A [slots, ra, K]."""
        ptrs = a_ptr + tl.maximum(slot, 0).to(tl.int64)[:, None] * ra * K + jj[:, None] * K + offs_k[None, :]
        return ptrs, ((slot >= 0) & (jj < ra))[:, None] & k_ok[None, :]

    @triton.jit
    def shrink_chunk(a, act, slot, ids_v, U: tl.constexpr, RA_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                     UPCAST: tl.constexpr):
        """[RA_PAD, BLOCK_M]: each row m's own adapter's rows of a ([U * RA_PAD, k]) @ act ([k, BLOCK_M])."""
        p = dot_acc(a, tl.trans(act), tl.zeros((U * RA_PAD, BLOCK_M), dtype=tl.float32), UPCAST)
        p = tl.where(slot[:, None] == ids_v[None, :], p, 0.0)
        return tl.sum(tl.reshape(p, (U, RA_PAD, BLOCK_M)), axis=0)

    @triton.jit
    def shrink_rows(h_ptr, a_ptr, a0, slot0, nw_ptr, act, offs_k, k_ok, ids_v, first, order, offs_m, m_ok, K, ra,
                    RA_PAD: tl.constexpr, BLOCK_M: tl.constexpr, U: tl.constexpr, NORM: tl.constexpr,
                    UPCAST: tl.constexpr):
        """h[m, :ra] += A[slot of row m][:, offs_k] @ act[:, m], fp32 atomics (rows without an
        adapter add nothing): a K part of a LoRA shrink, from the act tile ([len(offs_k),
        BLOCK_M]) a program holds. a0, slot0: the first U distinct adapters' tile and its rows'
        slots (chunk_slots and a_chunk of u0 = 0, loaded early by the caller); more adapters
        load here, U at a time. A: [slots, ra, K];
        NORM: act times the RMSNorm weight at offs_k, rounded as load_act rounds it (the
        1 / rms comes later, in the linear that reads h)."""
        if NORM:
            nw = tl.load(nw_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            act = (act.to(tl.float32) * nw[:, None]).to(act.dtype)
        h = shrink_chunk(a0, act, slot0, ids_v, U, RA_PAD, BLOCK_M, UPCAST)
        for u0 in range(U, tl.sum(first.to(tl.int32)), U):
            slot, jj = chunk_slots(ids_v, first, order, u0, U, RA_PAD)
            ptrs, ok = a_chunk(a_ptr, slot, jj, ra, K, offs_k, k_ok)
            h += shrink_chunk(tl.load(ptrs, mask=ok, other=0.0), act, slot, ids_v, U, RA_PAD, BLOCK_M, UPCAST)
        offs_a = tl.arange(0, RA_PAD)
        tl.atomic_add(h_ptr + offs_m[None, :] * ra + offs_a[:, None], h,
                      mask=(offs_a < ra)[:, None] & (m_ok & (ids_v >= 0))[None, :], sem="relaxed")
