"""One decode-step linear in one Triton launch: RMSNorm, GEMM, bias, LoRA, SwiGLU, residual.

At decode batch sizes (M <= 64 rows) a projection is a stream of weights past a few rows:
cuBLAS ran Qwen2.5-0.5B's qkv and o GEMMs at ~0.4 TB/s on an H200 (4-5 us for 1-2 MB,
too few programs each reading a long K), its down GEMM as a split-K pair of kernels, and
the norms, activation and residual adds were small kernels of their own (11.5 launches a
layer; in a CUDA graph each also costs a gap). `decode_linear` computes

    y = epi(norm(x) @ W^T + bias + scaling[ids] * B[ids] @ (A[ids] @ norm(x))) (+ residual)

in one launch, where norm is the identity or RMSNorm (x times the norm weight as it is
loaded, each row scaled by 1 / rms at the end: its sum of squares comes from the same
loads) and epi the identity or, for gate_up, silu(gate) * up (`swiglu`: a program holds
the same columns of both halves). A layer is then 4 launches and attention. The grid holds:
- LoRA shrink programs (lowest program ids): (row, K chunk) -> partial A[ids[row]] @ x;
- GEMM programs: (N block, K split) -> a partial of W[block] @ x^T for all rows, fp32,
  into a workspace; the last of an N block's splits to finish (an atomic counter) sums
  the partials in a fixed order, waits for the shrink programs (a spin on a counter:
  they have lower ids, so they were scheduled first and never wait themselves), adds
  bias and each row's LoRA expand, rounds, applies epi, adds the residual and stores.
Counters live in one persistent zeroed buffer and every launch leaves them at zero (the
last finisher resets them), so the launch needs no memset and can be captured in a graph.
On Hopper the launch is a programmatic dependent launch (lora.triton_ops.use_pdl): it
starts while the previous kernel finishes and waits for it inside.

Rounding follows the eager decoder where it can: the projection (with bias and LoRA) is
rounded before silu * up and before the residual add; RMSNorm rounds x * weight instead of
eager's normalised x (a different, not a larger, error).
Registered as `torch.ops.tasktune.decode_linear` so torch.compile keeps it whole. Runs on
the CPU under TRITON_INTERPRET=1 (tests), where programs run one at a time in order.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tasktune.lora.triton_ops import _pow2_at_least, available, counter_buffer, triton, use_pdl

__all__ = ["available", "decode_linear", "MAX_ROWS"]

MAX_ROWS = 64  # decode buckets above this run cuBLAS + the LoRA kernel pair
MAX_RANK = 64
COUNTERS = 4096  # int32 counters per device: N blocks + 2 per launch
EXPAND_TILE = 4096  # LoRA: elements of the gathered [rows, rank chunk, N block] tile of B
SHRINK_TILE = 8192  # LoRA shrink: elements of A a program holds per step ([R, BLOCK_K])
SHRINK_SPLITS = 4  # ... and up to this many programs a row, each a contiguous part of K: the
# expand waits for the shrink, so its latency (steps a program takes) is on the critical path
# (one program a row was ~8 us for a fused qkv on an H200); the expand sums the parts

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _act(x_ptr, nw_ptr, rows, k, row_ok, k_ok, stride_xm, NORM: tl.constexpr):
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
    def _dot(w, xa, acc, UPCAST: tl.constexpr):
        if UPCAST:  # the interpreter's bf16 dot is wrong (triton 3.x): fp32 there
            return tl.dot(w.to(tl.float32), tl.trans(xa.to(tl.float32)), acc)
        return tl.dot(w, tl.trans(xa), acc)

    @triton.jit
    def _partial(w_ptr, x_ptr, nw_ptr, row0, offs_n, n_ok, offs_m, m_ok, split, stride_xm,
                 K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 K_SPLIT: tl.constexpr, NORM: tl.constexpr, UPCAST: tl.constexpr):
        """W[row0 + offs_n, split's K range] @ act(x)[offs_m, same range]^T -> ([BLOCK_N,
        BLOCK_M] fp32, the rows' sums of squares over the range). (Reading the first weight
        tile before the PDL wait, and gate and up sharing one loop, measured 15% slower a
        decode step on an H200 than this plain loop called twice.)"""
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K_SPLIT, BLOCK_K):  # (bounds from program ids break the interpreter)
            k = split * K_SPLIT + k0 + offs_k
            k_ok = k < K
            w = tl.load(w_ptr + (row0 + offs_n)[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)
            xa, sq = _act(x_ptr, nw_ptr, offs_m, k, m_ok, k_ok, stride_xm, NORM)  # [BLOCK_M, BLOCK_K]
            ss += sq
            acc = _dot(w, xa, acc, UPCAST)
        return acc, ss

    @triton.jit
    def _h(s_ptr, offs_m, rr, hmask, col, S: tl.constexpr, R: tl.constexpr):
        """[BLOCK_M, RC] of A @ act(x): the shrink's S partial sums, in a fixed order."""
        h = tl.zeros(hmask.shape, dtype=tl.float32)
        for c in range(S):
            h += tl.load(s_ptr + (offs_m[:, None] * S + c) * R + col + rr[None, :], mask=hmask, other=0.0,
                         cache_modifier=".cg")
        return h

    @triton.jit
    def _expand(s_ptr, b_ptr, row_scale, slots, use, offs_m, offs_n, n_ok, col0, module, r, stride_bs, stride_bn,
                stride_br, R: tl.constexpr, R_MODULE: tl.constexpr, RC: tl.constexpr, S: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODULES: tl.constexpr, PER_COLUMN: tl.constexpr):
        """[BLOCK_N, BLOCK_M] LoRA deltas: row_scale[m] * B[slot_m, col0 + n, :] @ h_module[m]
        for every row at once (a gathered [BLOCK_M, RC, BLOCK_N] tile of B per rank chunk, any
        strides: rank-major storage reads whole rows of BLOCK_N, the pool's d_out-major one
        RC elements at a time); module: the module of each column ([BLOCK_N], PER_COLUMN) or
        of all of them (a scalar)."""
        delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R_MODULE, RC):
            rr = r0 + tl.arange(0, RC)
            r_ok = rr < r
            hmask = use[:, None] & r_ok[None, :]
            if PER_COLUMN:
                h = tl.broadcast_to(_h(s_ptr, offs_m, rr, hmask, 0, S, R)[:, :, None], (BLOCK_M, RC, BLOCK_N))
                if MODULES > 1:
                    h1 = _h(s_ptr, offs_m, rr, hmask, r, S, R)
                    h = tl.where(module[None, None, :] == 1, h1[:, :, None], h)
                if MODULES > 2:
                    h2 = _h(s_ptr, offs_m, rr, hmask, 2 * r, S, R)
                    h = tl.where(module[None, None, :] == 2, h2[:, :, None], h)
            else:
                h = _h(s_ptr, offs_m, rr, hmask, module * r, S, R)[:, :, None]
            b = tl.load(b_ptr + slots[:, None, None] * stride_bs + rr[None, :, None] * stride_br
                        + (col0 + offs_n)[None, None, :] * stride_bn,
                        mask=use[:, None, None] & r_ok[None, :, None] & n_ok[None, None, :], other=0.0)
            delta += tl.sum(b.to(tl.float32) * h, axis=1)
        return tl.trans(delta * row_scale[:, None])

    @triton.jit
    def _decode_linear(
        x_ptr, w_ptr, bias_ptr, nw_ptr, res_ptr, y_ptr, ws_ptr, cnt_ptr,
        a_ptr, b_ptr, scale_ptr, ids_ptr, s_ptr,
        M, stride_xm, stride_ym, stride_rm, r, bound1, bound2, eps, stride_bs, stride_bn, stride_br,
        N: tl.constexpr, K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
        K_SPLIT: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr, LORA: tl.constexpr, R: tl.constexpr, R_MODULE: tl.constexpr, RC: tl.constexpr,
        MODULES: tl.constexpr, S: tl.constexpr, SHRINK: tl.constexpr, SHRINK_K: tl.constexpr,
        SHRINK_BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr, PDL: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_blocks: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        if LORA and SHRINK:
            if pid < M * S:  # the first M * S programs: s[row, chunk, :] = A[ids[row]][:, chunk] @ act(x)[row, chunk]
                row = pid // S
                chunk = pid % S
                if PDL:
                    tl.extra.cuda.gdc_wait()
                slot = tl.load(ids_ptr + row).to(tl.int64)
                if slot >= 0:
                    offs_r = tl.arange(0, R)
                    offs_k = tl.arange(0, SHRINK_BLOCK_K)
                    rows1 = tl.full((1,), 0, tl.int32) + row
                    acc_r = tl.zeros((R,), dtype=tl.float32)
                    for k0 in range(0, SHRINK_K, SHRINK_BLOCK_K):
                        k = chunk * SHRINK_K + k0 + offs_k
                        k_ok = k < K
                        xk, _ = _act(x_ptr, nw_ptr, rows1, k, rows1 < M, k_ok, stride_xm, NORM)  # [1, BK]
                        a = tl.load(a_ptr + slot * (MODULES * r) * K + offs_r[:, None] * K + k[None, :],
                                    mask=(offs_r[:, None] < MODULES * r) & k_ok[None, :], other=0.0)
                        acc_r += tl.sum(a.to(tl.float32) * xk.to(tl.float32), axis=1)
                    tl.store(s_ptr + (row * S + chunk) * R + offs_r, acc_r)
                tl.atomic_add(cnt_ptr + n_blocks, 1, sem="release")
                return
            pid -= M * S
        block = pid // SPLIT_K
        split = pid % SPLIT_K
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        m_ok = offs_m < M
        if PDL:  # launched early (programmatic dependent launch): the previous kernel's output is ready after this
            tl.extra.cuda.gdc_wait()
        acc, ss = _partial(w_ptr, x_ptr, nw_ptr, 0, offs_n, n_ok, offs_m, m_ok, split, stride_xm, K, BLOCK_N,
                           BLOCK_M, BLOCK_K, K_SPLIT, NORM, UPCAST)
        if SWIGLU:  # the up rows start N rows further
            acc_u, _ = _partial(w_ptr, x_ptr, nw_ptr, N, offs_n, n_ok, offs_m, m_ok, split, stride_xm, K, BLOCK_N,
                                BLOCK_M, BLOCK_K, K_SPLIT, NORM, UPCAST)
        if PDL:  # the next kernel may launch (it waits for this one to finish before reading its output)
            tl.extra.cuda.gdc_launch_dependents()
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
            if arrived != SPLIT_K - 1:
                return
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
        rstd = tl.full((BLOCK_M,), 1.0, tl.float32)
        if NORM:  # RMSNorm(x) @ W^T = (x * weight) @ W^T / rms(x), per row
            rstd = 1.0 / tl.sqrt(ss / K + eps)
            acc = acc * rstd[None, :]
            if SWIGLU:
                acc_u = acc_u * rstd[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            if SWIGLU:
                acc_u += tl.load(bias_ptr + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        if LORA:
            if SHRINK:
                seen = tl.atomic_add(cnt_ptr + n_blocks, 0, sem="acquire")
                while seen < M * S:  # the shrink programs (lower ids, so scheduled first) are done
                    seen = tl.atomic_add(cnt_ptr + n_blocks, 0, sem="acquire")
            slots = tl.load(ids_ptr + offs_m, mask=m_ok, other=-1).to(tl.int64)
            use = slots >= 0
            slots = tl.maximum(slots, 0)
            row_scale = tl.load(scale_ptr + slots, mask=use, other=0.0).to(tl.float32) * rstd
            if SWIGLU:  # gate columns take module 0's h, up columns (N rows further in B) module 1's
                acc += _expand(s_ptr, b_ptr, row_scale, slots, use, offs_m, offs_n, n_ok, 0, 0, r, stride_bs,
                               stride_bn, stride_br, R, R_MODULE, RC, S, BLOCK_M, BLOCK_N, MODULES, False)
                acc_u += _expand(s_ptr, b_ptr, row_scale, slots, use, offs_m, offs_n, n_ok, N, 1, r, stride_bs,
                                 stride_bn, stride_br, R, R_MODULE, RC, S, BLOCK_M, BLOCK_N, MODULES, False)
            elif MODULES > 1:  # a fused linear: each column takes its module's h
                module = (offs_n >= bound1).to(tl.int32) + (offs_n >= bound2).to(tl.int32)  # [BLOCK_N]
                acc += _expand(s_ptr, b_ptr, row_scale, slots, use, offs_m, offs_n, n_ok, 0, module, r, stride_bs,
                               stride_bn, stride_br, R, R_MODULE, RC, S, BLOCK_M, BLOCK_N, MODULES, True)
            else:
                acc += _expand(s_ptr, b_ptr, row_scale, slots, use, offs_m, offs_n, n_ok, 0, 0, r, stride_bs,
                               stride_bn, stride_br, R, R_MODULE, RC, S, BLOCK_M, BLOCK_N, MODULES, False)
            if SHRINK:
                done = tl.atomic_add(cnt_ptr + n_blocks + 1, 1, sem="acq_rel")
                if done == n_blocks - 1:  # every block is past the wait: reset for the next launch
                    tl.store(cnt_ptr + n_blocks, 0)
                    tl.store(cnt_ptr + n_blocks + 1, 0)
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


@dataclass(frozen=True)
class LinearConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int
    K_SPLIT: int  # K elements per split (a multiple of BLOCK_K)
    num_warps: int = 4
    num_stages: int = 3


@functools.lru_cache(maxsize=None)
def linear_config(m: int, n: int, k: int, lora: bool = False, block_n: int = 0, block_k: int = 0,
                  split_k: int = 0, num_warps: int = 4, num_stages: int = 3) -> LinearConfig:
    """The launch for an [m, k] x [n, k]^T product (n: output columns). From a sweep on an
    H200 at m=32 (bench/decode_linear_bench.py): K blocks of 256; a weight of at most 1M
    elements in N blocks of 16 and one split; larger ones in N blocks of 64 (32 with LoRA
    below 4,096 outputs: the gathered B tile grows with the block) and 4 K splits.
    Explicit block_n / block_k / split_k override (benchmark sweeps)."""
    block_m = _pow2_at_least(m, 16)
    small = n * k <= (1 << 20)
    block_k = block_k or min(256 if block_m < 64 else 128, _pow2_at_least(k, 16))
    block_n = block_n or (16 if small else 32 if lora and n < 4096 else 64)
    blocks_k = triton.cdiv(k, block_k)
    want = split_k or (1 if small else min(4, blocks_k))
    per = triton.cdiv(blocks_k, want)
    return LinearConfig(block_m, block_n, block_k, triton.cdiv(blocks_k, per), per * block_k, num_warps, num_stages)


def _counter_buffer(device: torch.device) -> torch.Tensor:
    """The zeroed int32 counters every launch on `device` uses and leaves at zero."""
    return counter_buffer("decode_linear", device, COUNTERS)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, *, norm: tuple[torch.Tensor, float] | None = None,
                  swiglu: bool = False, lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  bounds: tuple[int, ...] = (), shrunk: torch.Tensor | None = None,
                  config: LinearConfig | None = None) -> torch.Tensor:
    """RMSNorm?(x) @ weight^T + bias + LoRA, then silu(gate) * up (swiglu), + residual ->
    [M, N] in x's dtype, in one launch.

    x: [M, K], M <= MAX_ROWS; norm = (weight [K], eps): the input is RMSNorm(x) * weight.
    weight: [N, K] contiguous (swiglu: [2N, K], gate rows then up rows, as gate_up_proj);
    bias: one per weight row; residual: [M, N]. lora = (A [slots, modules * r, K] contiguous,
    B [slots, weight rows, r] (any strides; rank-major storage, B.transpose(1, 2)
    contiguous, reads fastest), scaling [slots], ids [M], -1 for no adapter); bounds: the
    first weight row of modules 2.. of a fused linear (swiglu: exactly (N,)). shrunk: the
    shrink already done (`lora.triton_ops.lora_shrink` of the same x, A, ids and norm
    weight: [M, S, R] partial sums): the launch then only adds the expand; without it,
    shrink programs in the same launch compute it first."""
    M = x.shape[0]
    rows, K = weight.shape
    N = rows // 2 if swiglu else rows
    if x.dim() != 2 or x.shape[1] != K or x.stride(1) != 1 or not weight.is_contiguous() or (swiglu and rows % 2):
        raise ValueError(f"shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, swiglu {swiglu}")
    if not 0 < M <= MAX_ROWS:
        raise ValueError(f"{M} rows: decode_linear takes 1..{MAX_ROWS}")
    if bias is not None and bias.shape != (rows,):
        raise ValueError(f"bias {tuple(bias.shape)} for {rows} weight rows")
    if residual is not None and (residual.shape != (M, N) or residual.stride(1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} for output {(M, N)}")
    if norm is not None and (norm[0].shape != (K,) or not norm[0].is_contiguous()):
        raise ValueError(f"norm weight {tuple(norm[0].shape)} for {K} inputs")
    device = x.device
    cfg = config or linear_config(M, N, K, lora is not None)
    y = torch.empty(M, N, dtype=x.dtype, device=device)
    n_blocks = triton.cdiv(N, cfg.BLOCK_N)
    parts = 2 if swiglu else 1
    ws_size = (cfg.SPLIT_K * parts * cfg.BLOCK_M * n_blocks * cfg.BLOCK_N + n_blocks * cfg.SPLIT_K * cfg.BLOCK_M
               if cfg.SPLIT_K > 1 else 1)
    ws = torch.empty(ws_size, dtype=torch.float32, device=device)
    counters = _counter_buffer(device)
    if n_blocks + 2 > COUNTERS:
        raise ValueError(f"{N} outputs need {n_blocks + 2} counters (> {COUNTERS})")
    lora_args, strides = (x, x, x, x, x), (0, 0, 0)
    meta = dict(LORA=False, R=16, R_MODULE=16, RC=1, MODULES=1, S=1, SHRINK=False, SHRINK_K=16, SHRINK_BLOCK_K=16)
    r, b1, b2, shrink_programs = 1, rows, rows, 0
    if lora is not None:
        A, B, scaling, ids = lora
        modules = len(bounds) + 1
        r = B.shape[2]
        if (modules > 3 or A.shape[1:] != (modules * r, K) or B.shape[:2] != (A.shape[0], rows) or ids.shape != (M,)
                or r > MAX_RANK or not all(t.is_contiguous() for t in (A, scaling, ids))
                or (swiglu and tuple(bounds) != (N,))):
            raise ValueError(f"LoRA shapes: A {tuple(A.shape)}, B {tuple(B.shape)}, ids {tuple(ids.shape)}, "
                             f"bounds {tuple(bounds)} for a [{rows}, {K}] weight")
        b1, b2 = (list(bounds) + [rows, rows])[:2]
        R, R_MODULE = _pow2_at_least(modules * r, 16), _pow2_at_least(r, 16)
        shrink_block_k = max(16, min(256, SHRINK_TILE // R))
        shrink_k = triton.cdiv(triton.cdiv(K, SHRINK_SPLITS), shrink_block_k) * shrink_block_k
        S = triton.cdiv(K, shrink_k)
        if shrunk is not None:
            if shrunk.dim() != 3 or shrunk.shape[0] != M or shrunk.shape[2] != R or not shrunk.is_contiguous() \
                    or shrunk.dtype != torch.float32:
                raise ValueError(f"shrunk {tuple(shrunk.shape)} {shrunk.dtype}: want [{M}, S, {R}] float32, contiguous")
            S = shrunk.shape[1]
        shrink_programs = M * S if shrunk is None else 0
        rc = max(1, min(R_MODULE, EXPAND_TILE // (cfg.BLOCK_M * cfg.BLOCK_N)))
        s = torch.empty(M * S * R, dtype=torch.float32, device=device) if shrunk is None else shrunk
        lora_args, strides = (A, B, scaling, ids, s), (B.stride(0), B.stride(1), B.stride(2))
        meta = dict(LORA=True, R=R, R_MODULE=R_MODULE, RC=rc, MODULES=modules, S=S, SHRINK=shrunk is None,
                    SHRINK_K=shrink_k, SHRINK_BLOCK_K=shrink_block_k)
    grid = (shrink_programs + n_blocks * cfg.SPLIT_K,)
    pdl = use_pdl(device)
    _decode_linear[grid](
        x, weight, bias if bias is not None else x, norm[0] if norm is not None else x,
        residual if residual is not None else x, y, ws, counters, *lora_args,
        M, x.stride(0), y.stride(0), residual.stride(0) if residual is not None else 0, r, b1, b2,
        norm[1] if norm is not None else 0.0, *strides, N=N, K=K,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, SPLIT_K=cfg.SPLIT_K, K_SPLIT=cfg.K_SPLIT,
        NORM=norm is not None, SWIGLU=swiglu, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        UPCAST=device.type != "cuda", PDL=pdl, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta,
        **({"launch_pdl": True} if pdl else {}),
    )
    return y


@torch.library.custom_op("tasktune::decode_linear", mutates_args=())
def decode_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                     norm_weight: torch.Tensor | None, eps: float, swiglu: bool, A: torch.Tensor | None,
                     B: torch.Tensor | None, scaling: torch.Tensor | None, ids: torch.Tensor | None,
                     bounds: list[int], shrunk: torch.Tensor | None = None) -> torch.Tensor:
    """`decode_linear` as an operator torch.compile keeps whole (the decoder calls this one)."""
    return decode_linear(x, weight, bias, residual, norm=None if norm_weight is None else (norm_weight, eps),
                         swiglu=swiglu, lora=None if A is None else (A, B, scaling, ids), bounds=tuple(bounds),
                         shrunk=shrunk)


@decode_linear_op.register_fake
def _(x, weight, bias, residual, norm_weight, eps, swiglu, A, B, scaling, ids, bounds, shrunk=None):
    return x.new_empty(x.shape[0], weight.shape[0] // 2 if swiglu else weight.shape[0])
