"""Device functions of the fused decode linear (triton_linear.py): the K loop of a tile
(with RMSNorm folded into the loads) and LoRA's pieces: the batch's distinct adapters, the
wait for the shrink programs, and the expand as tensor-core products over chunks of them
(triton_lora_rows.py holds the pieces of the LoRA whose shrink a launch before has done).
"""
from __future__ import annotations

from tasktune.lora.triton_ops import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def load_act(x_ptr, nw_ptr, rows, k, row_ok, k_ok, stride_xm, NORM: tl.constexpr):
        """[rows, k] of the linear's input: x, or x * the RMSNorm weight (rounded to x's dtype;
        the 1 / rms of each row scales the product afterwards, `_decode_linear`) -> (tile,
        its squares summed over k in fp32)."""
        v = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        vf = v.to(tl.float32)
        if NORM:
            nw = tl.load(nw_ptr + k, mask=k_ok, other=0.0)
            v = (vf * nw.to(tl.float32)[None, :]).to(v.dtype)
        return v, tl.sum(vf * vf, axis=1)

    @triton.jit
    def dot_acc(w, xa, acc, UPCAST: tl.constexpr):
        if UPCAST:  # the interpreter's bf16 dot is wrong (triton 3.x): fp32 there
            return tl.dot(w.to(tl.float32), tl.trans(xa.to(tl.float32)), acc)
        return tl.dot(w, tl.trans(xa), acc)

    @triton.jit
    def k_partial(w_ptr, x_ptr, nw_ptr, row0, offs_n, n_ok, offs_m, m_ok, split, stride_xm,
                 K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 K_SPLIT: tl.constexpr, NORM: tl.constexpr, UPCAST: tl.constexpr):
        """W[row0 + offs_n, split's K range] @ act(x)[offs_m, same range]^T -> ([BLOCK_N,
        BLOCK_M] fp32, the rows' sums of squares over the range). (Reading the first weight
        tile before the PDL wait, and gate and up sharing one loop, measured 15% slower a
        decode step on an H200 than this plain loop called twice; gate and up in one loop
        alone, both tiles loaded before either product, 30,647 against 33,278 tok/s without
        adapters in session 8.)"""
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K_SPLIT, BLOCK_K):  # (bounds from program ids break the interpreter)
            k = split * K_SPLIT + k0 + offs_k
            k_ok = k < K
            w = tl.load(w_ptr + (row0 + offs_n)[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)
            xa, sq = load_act(x_ptr, nw_ptr, offs_m, k, m_ok, k_ok, stride_xm, NORM)  # [BLOCK_M, BLOCK_K]
            ss += sq
            acc = dot_acc(w, xa, acc, UPCAST)
        return acc, ss

    @triton.jit
    def distinct_adapters(ids_ptr, offs_m, M):
        """The rows' adapter slots (-1: none, and past M), which rows are the first of their
        adapter, and each first row's index among the batch's distinct adapters."""
        ids_v = tl.load(ids_ptr + offs_m, mask=offs_m < M, other=-1).to(tl.int32)
        dup = tl.sum(((ids_v[:, None] == ids_v[None, :]) & (offs_m[None, :] < offs_m[:, None])).to(tl.int32), axis=1)
        first = (dup == 0) & (ids_v >= 0)
        return ids_v, first, tl.cumsum(first.to(tl.int32), 0) - 1

    @triton.jit
    def nth_adapter(ids_v, first, order, u):
        """The slot of the batch's u-th distinct adapter (distinct_adapters' outputs), -1 past the last."""
        return tl.max(tl.where(first & (order == u), ids_v, -1), axis=0)

    @triton.jit
    def load_acquire(ptr, INTERPRETED: tl.constexpr):
        """A load with acquire semantics: every program polls one counter, and read-modify-write
        polls (atomics) would queue at that one address behind each other."""
        if INTERPRETED:
            return tl.atomic_add(ptr, 0, sem="acquire")
        return tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                         is_pure=False, pack=1)

    @triton.jit
    def wait_count(cnt_ptr, target, INTERPRETED: tl.constexpr):
        """Poll the counter at cnt_ptr until it reaches target (acquire)."""
        seen = load_acquire(cnt_ptr, INTERPRETED)
        while seen < target:
            seen = load_acquire(cnt_ptr, INTERPRETED)

    @triton.jit
    def stores_visible(pid, INTERPRETED: tl.constexpr):
        """Every thread's stores of this program made visible to the device (a fence, then a
        barrier), before a release add tells others to read them; pid: any scalar (the fence's operand)."""
        if not INTERPRETED:  # (no PTX under the interpreter, whose programs run one at a time)
            tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, $1;", "=r,r", [pid], dtype=tl.int32,
                                      is_pure=False, pack=1)
        tl.debug_barrier()

    @triton.jit
    def arrive(cnt_ptr, pid, INTERPRETED: tl.constexpr):
        """Add one to the counter at cnt_ptr after every thread's stores of this program."""
        stores_visible(pid, INTERPRETED)
        tl.atomic_add(cnt_ptr, 1, sem="release")

    @triton.jit
    def chunk_slots(ids_v, first, order, u0, U: tl.constexpr, RA_PAD: tl.constexpr):
        """For rank rows q of distinct adapters u0 .. u0 + U - 1 (RA_PAD rows each): each row's
        slot (-1 past the last adapter) and its row within the adapter."""
        q = tl.arange(0, U * RA_PAD)
        sel = first[None, :] & (order[None, :] == (u0 + q // RA_PAD)[:, None])
        return tl.max(tl.where(sel, ids_v[None, :], -1), axis=1), q % RA_PAD

    @triton.jit
    def b_chunk(b_ptr, slot, jj, r, b_row0, offs_n, n_ok, stride_bs, stride_bn, stride_br, live):
        """[BLOCK_N, U * R_MODULE] of B [slots, rows, r]: rows b_row0 + offs_n, columns the rank
        rows (slot, jj) of chunk_slots; nothing loads where live is false."""
        use = (slot >= 0) & (jj < r) & ((slot * 0 + live) != 0)  # (a bool vector under the interpreter too)
        return tl.load(b_ptr + tl.maximum(slot, 0).to(tl.int64)[None, :] * stride_bs + jj[None, :] * stride_br
                       + (b_row0 + offs_n)[:, None] * stride_bn, mask=n_ok[:, None] & use[None, :], other=0.0)

    @triton.jit
    def h_chunk(h_ptr, slot, jj, ids_v, offs_m, mod, r, ra, live):
        """[U * R_MODULE, BLOCK_M]: module mod's ranks of h [M, ra] for the rank rows (slot, jj),
        each row m keeping only its own adapter's (others 0)."""
        rows = (slot[:, None] == ids_v[None, :]) & ((slot >= 0) & (jj < r) & ((slot * 0 + live) != 0))[:, None]
        return tl.load(h_ptr + offs_m[None, :] * ra + mod * r + jj[:, None], mask=rows, other=0.0)

    @triton.jit
    def expand_rows(delta, b, h, col_ok, UPCAST: tl.constexpr):
        """delta [BLOCK_N, BLOCK_M] += b (where col_ok) @ h: the expand of one module."""
        return dot_acc(tl.where(col_ok[:, None], b, 0.0).to(b.dtype), tl.trans(h).to(b.dtype), delta, UPCAST)

    @triton.jit
    def expand_chunk(delta, s_ptr, b_ptr, cnt_ptr, wait_for, ids_v, first, order, offs_m, offs_n, n_ok, b_row0, chunk,
                    r, bound1, bound2, stride_bs, stride_bn, stride_br, WAIT: tl.constexpr, MODULE: tl.constexpr,
                    MODULES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_MODULE: tl.constexpr,
                    RA_PAD: tl.constexpr, S: tl.constexpr, UC: tl.constexpr, UPCAST: tl.constexpr,
                    H_ROWS: tl.constexpr = False):
        """delta += B tiles of distinct adapters chunk * UC ... + UC - 1 ([BLOCK_N, UC * rank])
        @ their h ([UC * rank, BLOCK_M], row m keeping only its own adapter's ranks). WAIT:
        spin until the shrink programs are done (counter at wait_for) after issuing the B
        loads, which do not depend on them, so their latency hides behind the wait. H_ROWS: h
        is given a row each ([M, modules * r] at s_ptr, shrink_rows), not by the shrink programs."""
        KC: tl.constexpr = UC * R_MODULE
        slot, jj = chunk_slots(ids_v, first, order, chunk * UC, UC, R_MODULE)
        b = b_chunk(b_ptr, slot, jj, r, b_row0, offs_n, n_ok, stride_bs, stride_bn, stride_br, True)
        if WAIT:  # until the shrink programs (lower ids, so scheduled first) are done
            wait_count(cnt_ptr, wait_for, UPCAST)
        module = (offs_n >= bound1).to(tl.int32) + (offs_n >= bound2).to(tl.int32)
        for j in tl.static_range(MODULES if MODULE < 0 else 1):
            if MODULE < 0:  # a fused qkv: the columns of module j take its h
                mod = j
                col_ok = module == j
            else:
                mod = MODULE
                col_ok = n_ok
            if tl.sum(col_ok.to(tl.int32)) > 0:
                if H_ROWS:
                    h = h_chunk(s_ptr, slot, jj, ids_v, offs_m, mod, r, MODULES * r, True)
                else:  # the shrink programs' S parts, [part, row, distinct adapter u, rank row]
                    u = chunk * UC + tl.arange(0, KC) // R_MODULE
                    rows = (slot[:, None] == ids_v[None, :]) & ((slot >= 0) & (jj < r))[:, None]
                    h = tl.zeros((KC, BLOCK_M), dtype=tl.float32)
                    for p in tl.static_range(S):
                        h += tl.load(s_ptr + ((p * BLOCK_M + offs_m[None, :]) * BLOCK_M + u[:, None]) * RA_PAD
                                     + mod * r + jj[:, None], mask=rows, other=0.0, cache_modifier=".cg")
                delta = expand_rows(delta, b, h, col_ok, UPCAST)
        return delta

    @triton.jit
    def expand_delta(s_ptr, b_ptr, cnt_ptr, wait_for, ids_v, first, order, offs_m, offs_n, n_ok, b_row0, split, r,
                    bound1, bound2, stride_bs, stride_bn, stride_br, WAIT: tl.constexpr, MODULE: tl.constexpr,
                    MODULES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_MODULE: tl.constexpr,
                    RA_PAD: tl.constexpr, S: tl.constexpr, SPLIT_K: tl.constexpr, UC: tl.constexpr,
                    UPCAST: tl.constexpr):
        """[BLOCK_N, BLOCK_M] of B[slot_m, b_row0 + n] @ h_m, unscaled, for this split's chunks
        of the batch's distinct adapters (UC adapters a chunk; chunks split, split + SPLIT_K,
        ...): one tensor-core product per chunk, so each distinct adapter's B is read once,
        not once per row. h is the sum of the shrink programs' S parts. MODULE: the module of
        every column, or -1: each column's module from the bounds (a fused qkv)."""
        delta = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        n_distinct = tl.sum(first.to(tl.int32))
        for c in tl.static_range((BLOCK_M + UC * SPLIT_K - 1) // (UC * SPLIT_K)):
            chunk = split + c * SPLIT_K
            if WAIT and c == 0:  # always: it holds the wait
                delta = expand_chunk(delta, s_ptr, b_ptr, cnt_ptr, wait_for, ids_v, first, order, offs_m, offs_n, n_ok,
                                    b_row0, chunk, r, bound1, bound2, stride_bs, stride_bn, stride_br, WAIT, MODULE,
                                    MODULES, BLOCK_M, BLOCK_N, R_MODULE, RA_PAD, S, UC, UPCAST)
            elif chunk * UC < n_distinct:
                delta = expand_chunk(delta, s_ptr, b_ptr, cnt_ptr, wait_for, ids_v, first, order, offs_m, offs_n, n_ok,
                                    b_row0, chunk, r, bound1, bound2, stride_bs, stride_bn, stride_br, False, MODULE,
                                    MODULES, BLOCK_M, BLOCK_N, R_MODULE, RA_PAD, S, UC, UPCAST)
        return delta
