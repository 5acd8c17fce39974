"""The fused decode linear's Triton kernel; triton_linear.py says what it computes and how
(its module docstring) and launches it (`decode_linear`)."""
from __future__ import annotations

from tasktune.lora.triton_ops import triton

if triton is not None:
    import triton.language as tl

    from tasktune.serve.triton_linear_blocks import (arrive, distinct_adapters, expand_chunk, expand_delta, k_partial,
                                                      load_acquire, nth_adapter, wait_count)
    from tasktune.serve.triton_linear_blocks import b_chunk, chunk_slots, expand_rows, h_chunk
    from tasktune.serve.triton_lora_few import few_expand, few_rank_rows, few_shrink
    from tasktune.serve.triton_lora_rows import a_chunk, prefetch_l2, shrink_rows

    @triton.jit(do_not_specialize=["wait_for"])  # one kernel for every target: a new one may load mid-chain
    def _decode_linear(
        x_ptr, w_ptr, bias_ptr, nw_ptr, res_ptr, y_ptr, ws_ptr, cnt_ptr,
        a_ptr, b_ptr, scale_ptr, ids_ptr, s_ptr, d_ptr, sig_ptr, wait_ptr, wait_for, an_ptr, nwn_ptr, hn_ptr, ra_next,
        fs_ptr, fr_ptr,
        M, stride_xm, stride_ym, stride_rm, stride_dm, r, bound1, bound2, eps, stride_bs, stride_bn, stride_br,
        N: tl.constexpr, K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
        K_SPLIT: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr, LORA: tl.constexpr, HAS_DELTA: tl.constexpr, R_MODULE: tl.constexpr, RA_PAD: tl.constexpr,
        MODULES: tl.constexpr, S: tl.constexpr, SHRINK_K: tl.constexpr, SHRINK_BLOCK_K: tl.constexpr,
        UC: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
        EARLY: tl.constexpr = False, LATE: tl.constexpr = False,  # triton_ops.PDL_EARLY, LATE_WAIT
        DELTA_RMS: tl.constexpr = True,  # NORM: the delta holds the 1 / rms (else scaled with the projection)
        SIGNAL: tl.constexpr = False,  # count each stored N block at sig_ptr (release): a LoRA worker polls it
        WAIT_DELTA: tl.constexpr = False,  # before reading the delta, poll wait_ptr until it reaches wait_for
        H_ROWS: tl.constexpr = False,  # LORA's shrink is done (h [M, modules * r] at s_ptr): expand only
        SHRINK_NEXT: tl.constexpr = False,  # add the next linear's shrink over this output's columns into hn_ptr
        NEXT_NORM: tl.constexpr = False, NEXT_RA_PAD: tl.constexpr = 16,  # ... of RMSNorm(output) (weight nwn_ptr)
        SHRINK_U: tl.constexpr = 4,  # ... its distinct adapters a tensor-core product
        ROW_U: tl.constexpr = 4,  # H_ROWS: the distinct adapters whose B and h load early (more: after the GEMM)
        FEW: tl.constexpr = False,  # LoRA of <= FEWN adapters (slots at fs_ptr, each row's index at fr_ptr):
        FEWN: tl.constexpr = 4, FEW_S: tl.constexpr = 1, FEW_KS: tl.constexpr = 16,  # triton_lora_few.py
        NB_PAD: tl.constexpr = 16,  # ... (N blocks, padded to a power of two)
        FEW_GATHER: tl.constexpr = False,  # ... each row's own ranks of h loaded (else all FEWN adapters')
    ):
        pid = tl.program_id(0)
        n_blocks: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        if FEW:
            if pid < MODULES * FEW_S:  # shrink programs (module, part of K)
                few_shrink(pid, a_ptr, x_ptr, nw_ptr, s_ptr, cnt_ptr, fs_ptr, offs_m, m_ok, stride_xm, r, n_blocks,
                           K, MODULES, FEW_S, R_MODULE, FEWN, BLOCK_M, BLOCK_K, FEW_KS, NB_PAD, NORM, PDL, EARLY,
                           UPCAST)
                return
            pid -= MODULES * FEW_S
        if LORA and not H_ROWS:
            if pid < BLOCK_M * S:  # shrink programs (u, part): h[part, rows of adapter u, u] = A[slot u] @ act(x)
                u = pid // S
                part = pid % S
                ids_v, first, order = distinct_adapters(ids_ptr, offs_m, M)  # the step's inputs: before the wait
                if PDL:
                    tl.extra.cuda.gdc_wait()
                slot = nth_adapter(ids_v, first, order, u)
                if slot >= 0:
                    rows_u = m_ok & (ids_v == slot)
                    offs_a = tl.arange(0, RA_PAD)
                    a_ok = offs_a < MODULES * r
                    h, _ = k_partial(a_ptr + slot.to(tl.int64) * (MODULES * r) * K, x_ptr, nw_ptr, 0, offs_a, a_ok,
                                    offs_m, rows_u, part, stride_xm, K, RA_PAD, BLOCK_M, SHRINK_BLOCK_K, SHRINK_K,
                                    NORM, UPCAST)  # [RA_PAD, BLOCK_M]
                    tl.store(s_ptr + ((part * BLOCK_M + offs_m[None, :]) * BLOCK_M + u) * RA_PAD + offs_a[:, None], h,
                             mask=a_ok[:, None] & rows_u[None, :])
                tl.atomic_add(cnt_ptr + n_blocks, 1, sem="release")
                return
            pid -= BLOCK_M * S
        block = pid // SPLIT_K
        split = pid % SPLIT_K
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        if LORA or SHRINK_NEXT:  # the rows' adapters are the step's inputs, not the previous kernel's output:
            ids_v, first, order = distinct_adapters(ids_ptr, offs_m, M)  # read before the wait
        if LORA:
            row_scale = tl.load(scale_ptr + tl.maximum(ids_v, 0), mask=ids_v >= 0, other=0.0).to(tl.float32)
        if LORA and H_ROWS:  # split 0 expands: its B tiles are weights, loaded before the wait
            eslot, ejj = chunk_slots(ids_v, first, order, 0, ROW_U, R_MODULE)
            eb = b_chunk(b_ptr, eslot, ejj, r, 0, offs_n, n_ok, stride_bs, stride_bn, stride_br, split == 0)
            if SWIGLU:
                eb_u = b_chunk(b_ptr, eslot, ejj, r, N, offs_n, n_ok, stride_bs, stride_bn, stride_br, split == 0)
        if SHRINK_NEXT:  # the next linear's A rows for these columns: into registers, or L2 when a split stores
            nslot, njj = chunk_slots(ids_v, first, order, 0, SHRINK_U, NEXT_RA_PAD)
            na_ptrs, na_ok = a_chunk(an_ptr, nslot, njj, ra_next, N, offs_n, n_ok)
            if SPLIT_K == 1:
                na = tl.load(na_ptrs, mask=na_ok, other=0.0)
            else:  # (a row's BLOCK_N columns: one 128-byte line at 64 bf16)
                prefetch_l2(an_ptr + tl.maximum(nslot, 0).to(tl.int64) * ra_next * N + njj * N + block * BLOCK_N,
                            (nslot >= 0) & (njj < ra_next) & (split == 0), UPCAST)
        if FEW:  # step inputs (not the previous kernel's output): before the wait
            fslot, fjj, fok = few_rank_rows(fs_ptr, r, R_MODULE, FEWN)
            fscale = tl.load(scale_ptr + tl.maximum(fslot, 0), mask=fok, other=0.0).to(tl.float32)
            frow = tl.load(fr_ptr + offs_m, mask=m_ok, other=-1)
            frs = tl.load(scale_ptr + tl.maximum(tl.load(fs_ptr + tl.maximum(frow, 0)), 0), mask=frow >= 0,
                          other=0.0).to(tl.float32)
            if SWIGLU:
                fmod = 0
            else:  # (the host checks that the module bounds fall on N block edges)
                fmod = (block * BLOCK_N >= bound1).to(tl.int32) + (block * BLOCK_N >= bound2).to(tl.int32)
        if PDL and not LATE:  # launched early (programmatic dependent launch)
            tl.extra.cuda.gdc_wait()  # the previous kernel's output is ready after this
            if EARLY:
                tl.extra.cuda.gdc_launch_dependents()
        if LORA and H_ROWS:  # h is the previous launch's output: loaded now, used after the GEMM
            eh0 = h_chunk(s_ptr, eslot, ejj, ids_v, offs_m, 0, r, MODULES * r, split == 0)
            if MODULES > 1:
                eh1 = h_chunk(s_ptr, eslot, ejj, ids_v, offs_m, 1, r, MODULES * r, split == 0)
            if MODULES > 2:
                eh2 = h_chunk(s_ptr, eslot, ejj, ids_v, offs_m, 2, r, MODULES * r, split == 0)
        acc, ss = k_partial(w_ptr, x_ptr, nw_ptr, 0, offs_n, n_ok, offs_m, m_ok, split, stride_xm, K, BLOCK_N,
                           BLOCK_M, BLOCK_K, K_SPLIT, NORM, UPCAST)
        if SWIGLU:  # the up rows start N rows further
            acc_u, _ = k_partial(w_ptr, x_ptr, nw_ptr, N, offs_n, n_ok, offs_m, m_ok, split, stride_xm, K, BLOCK_N,
                                BLOCK_M, BLOCK_K, K_SPLIT, NORM, UPCAST)
        if PDL and not EARLY and not LATE:  # the next kernel may launch (it waits for this one to finish)
            tl.extra.cuda.gdc_launch_dependents()
        if LORA and H_ROWS:  # split 0's expand of the first ROW_U adapters (registers), then any more
            zero = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            if SWIGLU:
                acc += row_scale[None, :] * expand_rows(zero, eb, eh0, n_ok, UPCAST)
                acc_u += row_scale[None, :] * expand_rows(zero, eb_u, eh1, n_ok, UPCAST)
            else:
                module = (offs_n >= bound1).to(tl.int32) + (offs_n >= bound2).to(tl.int32)
                d = expand_rows(zero, eb, eh0, n_ok & (module == 0), UPCAST)
                if MODULES > 1:
                    d = expand_rows(d, eb, eh1, module == 1, UPCAST)
                if MODULES > 2:
                    d = expand_rows(d, eb, eh2, module == 2, UPCAST)
                acc += row_scale[None, :] * d
            if split == 0:
                for c in range(1, (tl.sum(first.to(tl.int32)) + ROW_U - 1) // ROW_U):
                    if SWIGLU:
                        acc += row_scale[None, :] * expand_chunk(
                            zero, s_ptr, b_ptr, cnt_ptr, 0, ids_v, first, order, offs_m, offs_n, n_ok, 0, c, r, bound1,
                            bound2, stride_bs, stride_bn, stride_br, False, 0, MODULES, BLOCK_M, BLOCK_N, R_MODULE,
                            RA_PAD, 1, ROW_U, UPCAST, True)
                        acc_u += row_scale[None, :] * expand_chunk(
                            zero, s_ptr, b_ptr, cnt_ptr, 0, ids_v, first, order, offs_m, offs_n, n_ok, N, c, r, bound1,
                            bound2, stride_bs, stride_bn, stride_br, False, 1, MODULES, BLOCK_M, BLOCK_N, R_MODULE,
                            RA_PAD, 1, ROW_U, UPCAST, True)
                    else:
                        acc += row_scale[None, :] * expand_chunk(
                            zero, s_ptr, b_ptr, cnt_ptr, 0, ids_v, first, order, offs_m, offs_n, n_ok, 0, c, r, bound1,
                            bound2, stride_bs, stride_bn, stride_br, False, -1 if MODULES > 1 else 0, MODULES,
                            BLOCK_M, BLOCK_N, R_MODULE, RA_PAD, 1, ROW_U, UPCAST, True)
        elif LORA:  # this split's share of the expand, scaled per row, joins its partial (rstd applies later)
            if SWIGLU:  # gate columns take module 0's h, up columns (N rows further in B) module 1's
                acc += row_scale[None, :] * expand_delta(
                    s_ptr, b_ptr, cnt_ptr + n_blocks, BLOCK_M * S, ids_v, first, order, offs_m, offs_n, n_ok, 0, split,
                    r, bound1, bound2, stride_bs, stride_bn, stride_br, True, 0, MODULES, BLOCK_M, BLOCK_N, R_MODULE,
                    RA_PAD, S, SPLIT_K, UC, UPCAST)
                acc_u += row_scale[None, :] * expand_delta(
                    s_ptr, b_ptr, cnt_ptr + n_blocks, BLOCK_M * S, ids_v, first, order, offs_m, offs_n, n_ok, N, split,
                    r, bound1, bound2, stride_bs, stride_bn, stride_br, False, 1, MODULES, BLOCK_M, BLOCK_N, R_MODULE,
                    RA_PAD, S, SPLIT_K, UC, UPCAST)
            else:
                acc += row_scale[None, :] * expand_delta(
                    s_ptr, b_ptr, cnt_ptr + n_blocks, BLOCK_M * S, ids_v, first, order, offs_m, offs_n, n_ok, 0, split,
                    r, bound1, bound2, stride_bs, stride_bn, stride_br, True, -1 if MODULES > 1 else 0, MODULES,
                    BLOCK_M, BLOCK_N, R_MODULE, RA_PAD, S, SPLIT_K, UC, UPCAST)
        N_PAD: tl.constexpr = n_blocks * BLOCK_N
        PARTS: tl.constexpr = 2 if SWIGLU else 1
        SS_AT: tl.constexpr = SPLIT_K * PARTS * BLOCK_M * N_PAD  # then [n_blocks, SPLIT_K, BLOCK_M] sums of squares
        tile = offs_n[:, None] + offs_m[None, :] * N_PAD  # workspace [SPLIT_K, PARTS, BLOCK_M, N_PAD]
        if SPLIT_K > 1:
            tl.store(ws_ptr + split * PARTS * BLOCK_M * N_PAD + tile, acc)
            if SWIGLU:
                tl.store(ws_ptr + (split * PARTS + 1) * BLOCK_M * N_PAD + tile, acc_u)
            if NORM:
                tl.store(ws_ptr + SS_AT + (block * SPLIT_K + split) * BLOCK_M + offs_m, ss)
            arrived = tl.atomic_add(cnt_ptr + block, 1, sem="acq_rel")
            if FEW:  # the splits count 1 each, the shrink parts 1 << 16 each
                if arrived % 65536 != SPLIT_K - 1:
                    return
                while arrived // 65536 < MODULES * FEW_S:  # (rare: the shrink programs started first)
                    arrived = load_acquire(cnt_ptr + block, UPCAST)
            elif arrived != SPLIT_K - 1:
                return
            if SHRINK_NEXT:  # the storing split: its A rows from L2 (prefetched), beside the partials' loads
                na = tl.load(na_ptrs, mask=na_ok, other=0.0)
            if LORA and not H_ROWS:  # one count an N block (its last split): at the last, all are past the wait
                done = tl.atomic_add(cnt_ptr + n_blocks + 1, 1, sem="acq_rel")  # (used at the end: latency hidden)
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            if SWIGLU:
                acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for other in range(SPLIT_K):  # a fixed order: the sum does not depend on who finished last
                acc += tl.load(ws_ptr + other * PARTS * BLOCK_M * N_PAD + tile, cache_modifier=".cg")
                if SWIGLU:
                    acc_u += tl.load(ws_ptr + (other * PARTS + 1) * BLOCK_M * N_PAD + tile, cache_modifier=".cg")
                if NORM:
                    ss += tl.load(ws_ptr + SS_AT + (block * SPLIT_K + other) * BLOCK_M + offs_m, cache_modifier=".cg")
            tl.store(cnt_ptr + block, 0)
        elif LORA and not H_ROWS:  # (H_ROWS: no shrink programs, no counts)
            done = tl.atomic_add(cnt_ptr + n_blocks + 1, 1, sem="acq_rel")
        elif FEW:  # one program an N block: only the shrink parts count
            wait_count(cnt_ptr + block, MODULES * FEW_S * 65536, UPCAST)
            tl.store(cnt_ptr + block, 0)
        if FEW:  # the expand: one more K step of the accumulator(s)
            acc = few_expand(acc, s_ptr, b_ptr, fslot, fjj, fok, fscale, frow, frs, offs_m, offs_n, n_ok, 0, fmod,
                             stride_bs, stride_bn, stride_br, MODULES, FEW_S, R_MODULE, FEWN, BLOCK_M, FEW_GATHER,
                             UPCAST)
            if SWIGLU:
                acc_u = few_expand(acc_u, s_ptr, b_ptr, fslot, fjj, fok, fscale, frow, frs, offs_m, offs_n, n_ok, N,
                                   1, stride_bs, stride_bn, stride_br, MODULES, FEW_S, R_MODULE, FEWN, BLOCK_M,
                                   FEW_GATHER, UPCAST)
        if NORM:  # RMSNorm(x) @ W^T = (x * weight) @ W^T / rms(x), per row (LoRA's shrink read the same x * weight)
            rstd = 1.0 / tl.sqrt(ss / K + eps)
            if DELTA_RMS or not HAS_DELTA:  # else once the delta has joined
                acc = acc * rstd[None, :]
                if SWIGLU:
                    acc_u = acc_u * rstd[None, :]
        if PDL and LATE:  # only the delta is the previous kernel's output (x was made before its shrink)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if WAIT_DELTA:  # the delta comes from a kernel beside this one (bench/lora_worker.py)
            wait_count(wait_ptr, wait_for, UPCAST)
        if HAS_DELTA:  # LoRA's delta computed before this launch (lora.triton_ops.lora_delta), fp32
            d_ok = n_ok[:, None] & m_ok[None, :]
            acc += tl.load(d_ptr + offs_m[None, :] * stride_dm + offs_n[:, None], mask=d_ok, other=0.0)
            if SWIGLU:
                acc_u += tl.load(d_ptr + offs_m[None, :] * stride_dm + N + offs_n[:, None], mask=d_ok, other=0.0)
            if NORM and not DELTA_RMS:
                acc = acc * rstd[None, :]
                if SWIGLU:
                    acc_u = acc_u * rstd[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            if SWIGLU:
                acc_u += tl.load(bias_ptr + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        out = acc.to(y_ptr.dtype.element_ty)
        if SWIGLU:  # silu(gate) * up, each rounded as the eager decoder rounds them
            gf = out.to(tl.float32)
            silu = (gf / (1.0 + tl.exp(-gf))).to(y_ptr.dtype.element_ty)
            out = (silu.to(tl.float32) * acc_u.to(y_ptr.dtype.element_ty).to(tl.float32)).to(y_ptr.dtype.element_ty)
        ok = n_ok[:, None] & m_ok[None, :]
        if HAS_RES:
            res = tl.load(res_ptr + offs_m[None, :] * stride_rm + offs_n[:, None], mask=ok, other=0.0)
            out = (out.to(tl.float32) + res.to(tl.float32)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], out, mask=ok)
        if SHRINK_NEXT:  # the next linear's LoRA shrink over these columns of its input
            shrink_rows(hn_ptr, an_ptr, na, nslot, nwn_ptr, out, offs_n, n_ok, ids_v, first, order, offs_m, m_ok, N,
                        ra_next, NEXT_RA_PAD, BLOCK_M, SHRINK_U, NEXT_NORM, UPCAST)
        if SIGNAL:
            arrive(sig_ptr, pid, UPCAST)
        if LORA and not H_ROWS:
            if done == n_blocks - 1:  # the last N block: reset the shrink and done counts for the next launch
                tl.store(cnt_ptr + n_blocks, 0)
                tl.store(cnt_ptr + n_blocks + 1, 0)
