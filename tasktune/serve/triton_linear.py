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
the same columns of both halves). A layer is then 4 launches and attention. The LoRA term
comes either as `delta` (fp32 [M, rows], computed before the launch by the BGMV pair,
lora.triton_ops.lora_delta: the decoder's default) or from `lora`, inside the launch.
With `lora`, the grid holds:
- LoRA shrink programs (lowest program ids), one per (distinct adapter of the batch, K
  part): h = A[slot] @ x^T for the rows using it, a tensor-core product over all of its
  modules' rank rows, so each adapter's A is read once a step (not once a row);
- GEMM programs: (N block, K split) -> a partial of W[block] @ x^T for all rows, fp32.
  With adapters each then waits for the shrink programs (a spin on a counter: they have
  lower ids, so they were scheduled first and never wait themselves) and adds its share
  of the expand: per distinct adapter, one tensor-core product of its B tile with the h
  of its rows (others masked), scaled per row. Splits store their partials in a
  workspace and the last of an N block's splits to finish (an atomic counter) sums them
  in a fixed order, adds bias, rounds, applies epi, adds the residual and stores.
Distinct adapters are found in the kernel (a row is an adapter's first if no earlier row
has its slot), so the launch takes the rows' slots alone and a CUDA graph of it serves
any mix. (Earlier designs, one shrink program per row with a gathered [rows, rank, N]
expand tile, or the shrink as a launch of its own, measured slower than cuBLAS + BGMV.)
Counters live in one persistent zeroed buffer and every launch leaves them at zero (the
last finisher resets them), so the launch needs no memset and can be captured in a graph.
On Hopper the launch is a programmatic dependent launch (lora.triton_ops.use_pdl): it
starts while the previous kernel finishes and waits for it inside, then lets the next one
launch (PDL_EARLY). With a `delta` it waits only in the epilogue, where it reads the delta
(LATE_WAIT): its input is older than the BGMV pair before it, so its GEMM runs beside the
pair (the rule that keeps this safe is in lora.triton_ops).

A third way, not the decoder's (decode_layers_bench.py times it; bench/README.md "Split
LoRA"): `h` and `shrink_next` split LoRA at the kernel boundary. The launch that produces a
linear's input adds that linear's shrink of the columns it stores into a per-row h (fp32
atomics; triton_lora_rows.py), and the linear, given h, only expands: no launch between
linears and no in-kernel wait. The chain measured slower than the BGMV pair; compiled
for sm_90 by Triton 3.9 (not the device's 3.6), these launches use 255 registers a thread
and spill up to 1.5 KB a thread, where the linears without LoRA do not spill.

A fourth, `few` (triton_lora_few.py), for a step of at most 4 distinct adapters: shrink
programs beside the GEMM programs, and the expand as one more K step of each N block's last
split, so no LoRA tile lives across the GEMM. It beat the BGMV pair in the layers bench but
not in the serve bench's decode step (bench/README.md), so the decoder leaves it off.

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

from tasktune.lora import triton_ops
from tasktune.lora.triton_ops import _pow2_at_least, available, counter_buffer, sm_count, triton
from tasktune.serve.triton_lora_few import FEW

__all__ = ["available", "decode_linear", "few_adapters", "MAX_ROWS"]

MAX_ROWS = 64  # decode buckets above this run cuBLAS + the LoRA kernel pair
# The decoder's BGMV deltas for a normed linear leave out the 1 / rms, which this kernel then
# applies to projection and delta together: the shrink skips its second read of the row (False:
# the shrink scales each part, session 10)
DELTA_BEFORE_RMS = True
MAX_RANK = 64
FEW_GATHER = False  # few=: each row loads only its own adapter's ranks of h (H200: 50.1 us a layer against 43.5)
SMALL = 1_000_000  # weight elements below which a linear runs unsplit in 16-column blocks (linear_config)
COUNTERS = 4096  # int32 counters per device: N blocks + 2 per launch
EXPAND_RANKS = 256  # LoRA expand: rank rows (distinct adapters x rank) per tensor-core product,
EXPAND_TILE = 8192  # ... and at most this many elements of B in it ([BLOCK_N, rank rows])
SHRINK_TILE = 8192  # LoRA shrink: elements of A a program holds per step ([modules * r, BLOCK_K])
SHRINK_SPLITS = 4  # ... and up to this many programs an adapter, each a contiguous part of K
# (the expand waits for the shrink, so its latency is on the critical path; the expand sums
# the parts), fewer where the shrink and GEMM programs would not all fit on the SMs at once:
# a GEMM program that finds no SM free starts only when a shrink program ends, and the
# shrink programs wait for the previous kernel like the rest (one 144 KB program an SM for
# 64-column blocks of K 256 in 3 stages)

if triton is not None:
    from tasktune.serve.triton_linear_kernel import _decode_linear


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
                  split_k: int = 0, num_warps: int = 4, num_stages: int = 3, elem: int = 2) -> LinearConfig:
    """The launch for an [m, k] x [n, k]^T product (n: output columns). From a sweep on an
    H200 at m=32 (bench/decode_linear_bench.py): K blocks of 256; a weight under SMALL
    elements (Qwen2.5-0.5B's o, 0.8M) in N blocks of 16 and one split; larger ones (its
    qkv, 1.03M: 5.5 us so against 7.5 unsplit in 16-column blocks), and any with LoRA
    (whose shrink and expand programs add latency that more, shorter programs hide), in N
    blocks of 64 and 4 K splits.
    elem: bytes an element (4-byte fp32 gets half the K block: the same shared memory).
    Explicit block_n / block_k / split_k override (benchmark sweeps)."""
    block_m = _pow2_at_least(m, 16)
    small = n * k < SMALL and not lora
    block_k = block_k or min((256 if block_m < 64 else 128) * 2 // elem, _pow2_at_least(k, 16))
    block_n = block_n or (16 if small else 64)
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
                  bounds: tuple[int, ...] = (), delta: torch.Tensor | None = None, delta_rms: bool = True,
                  config: LinearConfig | None = None, out: torch.Tensor | None = None,
                  signal: torch.Tensor | None = None, wait_delta: tuple[torch.Tensor, int] | None = None,
                  h: torch.Tensor | None = None,
                  shrink_next: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor] | None = None,
                  few: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """RMSNorm?(x) @ weight^T + bias + LoRA, then silu(gate) * up (swiglu), + residual ->
    [M, N] in x's dtype, in one launch.

    x: [M, K], M <= MAX_ROWS; norm = (weight [K], eps): the input is RMSNorm(x) * weight.
    weight: [N, K] contiguous (swiglu: [2N, K], gate rows then up rows, as gate_up_proj);
    bias: one per weight row; residual: [M, N]. lora = (A [slots, modules * r, K] contiguous,
    B [slots, weight rows, r] (any strides; the pool's contiguous layout reads each
    adapter's tile as one run), scaling [slots], ids [M], -1 for no adapter); bounds: the
    first weight row of modules 2.. of a fused linear (swiglu: exactly (N,)).
    delta: fp32 [M, weight rows] added to the projection before rounding, SwiGLU and the
    residual (the LoRA deltas computed by lora.triton_ops.lora_delta; instead of `lora`). With
    norm and delta_rms False the delta is that of x * weight (lora_delta(..., rms=False)), and
    the kernel scales projection and delta by 1 / rms together.
    out: the [M, N] output to write (else a new tensor). signal / wait_delta (GPU only, a
    LoRA worker beside the launch, bench/lora_worker.py): an int32 counter each stored N
    block adds one to; (counter, count) polled before the delta is read.
    h (with lora): fp32 [M, modules * r], the shrink A[ids] @ norm(x)^T already summed (without
    the 1 / rms: shrink_rows, from the previous launch's epilogue or lora_shrink_rows), so
    the launch only expands. shrink_next = (A [slots, ra, N] of the linear that reads this
    output, its RMSNorm weight [N] or None, ids [M], h [M, ra] fp32): this launch's epilogue
    adds that linear's shrink of its stored columns into h (zeroed before; atomics, so the
    sum's order, and its last bits, vary).
    few = (slots int32 [FEW], row_u int32 [M]) with lora: the batch uses at most FEW distinct
    adapters, slots their pool slots (-1 unused) and row_u each row's index into slots (-1:
    none; `few_adapters` makes both from ids); LoRA runs inside the launch as
    triton_lora_few.py says (lora's ids are not read)."""
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
    if delta is not None and (delta.shape != (M, rows) or delta.stride(1) != 1 or delta.dtype != torch.float32
                              or lora is not None):
        raise ValueError(f"delta {tuple(delta.shape)} {delta.dtype} for output {(M, rows)} (float32, not with lora)")
    device = x.device
    cfg = config or linear_config(M, N, K, lora is not None and h is None and few is None,
                                  elem=max(2, x.element_size()))
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=device)
    if y.shape != (M, N) or y.dtype != x.dtype or y.stride(1) != 1:
        raise ValueError(f"out {tuple(y.shape)} {y.dtype} for output {(M, N)} {x.dtype}")
    n_blocks = triton.cdiv(N, cfg.BLOCK_N)
    parts = 2 if swiglu else 1
    ws_size = (cfg.SPLIT_K * parts * cfg.BLOCK_M * n_blocks * cfg.BLOCK_N + n_blocks * cfg.SPLIT_K * cfg.BLOCK_M
               if cfg.SPLIT_K > 1 else 1)
    ws = torch.empty(ws_size, dtype=torch.float32, device=device)
    counters = _counter_buffer(device)
    if n_blocks + 2 > COUNTERS:
        raise ValueError(f"{N} outputs need {n_blocks + 2} counters (> {COUNTERS})")
    lora_args, strides = (x, x, x, x, x), (0, 0, 0)
    meta = dict(LORA=False, R_MODULE=16, RA_PAD=16, MODULES=1, S=1, SHRINK_K=16, SHRINK_BLOCK_K=16, UC=1)
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
        if h is not None and (h.shape != (M, modules * r) or h.dtype != torch.float32 or not h.is_contiguous()):
            raise ValueError(f"h {tuple(h.shape)} {h.dtype}: float32 [{M}, {modules * r}] contiguous")
        b1, b2 = (list(bounds) + [rows, rows])[:2]
        ra_pad = _pow2_at_least(modules * r, 16)
        shrink_block_k = max(16, min(256, SHRINK_TILE // ra_pad, _pow2_at_least(K, 16)))
        splits = max(1, min(SHRINK_SPLITS, (sm_count(device) - n_blocks * cfg.SPLIT_K) // cfg.BLOCK_M))
        shrink_k = triton.cdiv(triton.cdiv(K, splits), shrink_block_k) * shrink_block_k
        S = triton.cdiv(K, shrink_k) if h is None else 1
        shrink_programs = cfg.BLOCK_M * S if h is None else 0
        s = h if h is not None or few is not None else torch.empty(S * cfg.BLOCK_M * cfg.BLOCK_M * ra_pad,
                                                                   dtype=torch.float32, device=device)
        lora_args, strides = (A, B, scaling, ids, s), (B.stride(0), B.stride(1), B.stride(2))
        r_module = _pow2_at_least(r, 16)
        meta = dict(LORA=True, R_MODULE=r_module, RA_PAD=ra_pad, MODULES=modules, S=S, SHRINK_K=shrink_k,
                    SHRINK_BLOCK_K=shrink_block_k, UC=max(1, min(EXPAND_RANKS, EXPAND_TILE // cfg.BLOCK_N) // r_module),
                    H_ROWS=h is not None)
    elif h is not None or few is not None:
        raise ValueError("h (a LoRA shrink done) and few need lora")
    few_args = (x, x)
    if few is not None:
        slots, row_u = few
        if (h is not None or shrink_next is not None or slots.shape != (FEW,) or row_u.shape != (M,)
                or slots.dtype != torch.int32 or row_u.dtype != torch.int32
                or (not swiglu and any(b % cfg.BLOCK_N for b in bounds))):
            raise ValueError(f"few: slots {tuple(slots.shape)} {slots.dtype}, row_u {tuple(row_u.shape)} "
                             f"{row_u.dtype} (int32 [{FEW}], [{M}]); module bounds {tuple(bounds)} on "
                             f"{cfg.BLOCK_N}-row blocks; not with h or shrink_next")
        blocks_k = triton.cdiv(K, cfg.BLOCK_K)
        few_s = min(4, blocks_k)
        few_ks = triton.cdiv(blocks_k, few_s) * cfg.BLOCK_K
        few_s = triton.cdiv(K, few_ks)
        shrink_programs = modules * few_s
        hp = torch.empty(few_s * modules * FEW * meta["R_MODULE"] * cfg.BLOCK_M, dtype=torch.float32, device=device)
        lora_args = (*lora_args[:4], hp)
        few_args = (slots, row_u)
        meta.update(LORA=False, FEW=True, FEWN=FEW, FEW_S=few_s, FEW_KS=few_ks, NB_PAD=_pow2_at_least(n_blocks, 16),
                    FEW_GATHER=FEW_GATHER)
    next_args, ra_next = (x, x, x), 0
    if shrink_next is not None:
        a_next, nw_next, ids_next, h_next = shrink_next
        ra_next = a_next.shape[1]
        if (a_next.dim() != 3 or a_next.shape[2] != N or not a_next.is_contiguous() or ids_next.shape != (M,)
                or h_next.shape != (M, ra_next) or h_next.dtype != torch.float32 or not h_next.is_contiguous()
                or (nw_next is not None and nw_next.shape != (N,)) or ra_next > 3 * MAX_RANK
                or (lora is not None and ids_next.data_ptr() != lora[3].data_ptr())):
            raise ValueError(f"shrink_next: A {tuple(a_next.shape)}, ids {tuple(ids_next.shape)}, h "
                             f"{tuple(h_next.shape)} {h_next.dtype} for {M} rows of {N} outputs (lora's ids)")
        if lora is None:
            lora_args = (x, x, x, ids_next, x)
        next_args = (a_next, nw_next if nw_next is not None else x, h_next)
        meta.update(SHRINK_NEXT=True, NEXT_NORM=nw_next is not None, NEXT_RA_PAD=_pow2_at_least(ra_next, 16))
    grid = (shrink_programs + n_blocks * cfg.SPLIT_K,)
    launch = triton_ops.pdl_launch(device)
    late = launch["PDL"] and delta is not None and triton_ops.LATE_WAIT and wait_delta is None
    _decode_linear[grid](
        x, weight, bias if bias is not None else x, norm[0] if norm is not None else x,
        residual if residual is not None else x, y, ws, counters, *lora_args, delta if delta is not None else ws,
        signal if signal is not None else counters, wait_delta[0] if wait_delta else counters,
        wait_delta[1] if wait_delta else 0, *next_args, ra_next, *few_args,
        M, x.stride(0), y.stride(0), residual.stride(0) if residual is not None else 0,
        delta.stride(0) if delta is not None else 0, r, b1, b2,
        norm[1] if norm is not None else 0.0, *strides, N=N, K=K,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, SPLIT_K=cfg.SPLIT_K, K_SPLIT=cfg.K_SPLIT,
        NORM=norm is not None, SWIGLU=swiglu, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        HAS_DELTA=delta is not None, DELTA_RMS=delta_rms, SIGNAL=signal is not None, WAIT_DELTA=wait_delta is not None,
        UPCAST=device.type != "cuda", LATE=late, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta,
        **launch,
    )
    return y


def few_fits(rows: int, K: int, bounds: list[int] | tuple[int, ...], swiglu: bool, m: int = MAX_ROWS) -> bool:
    """Whether decode_linear takes `few` for this linear: its module bounds fall on N block edges."""
    cfg = linear_config(m, rows // 2 if swiglu else rows, K)
    return swiglu or all(b % cfg.BLOCK_N == 0 for b in bounds)


def few_table(ids: list[int]) -> list[int]:
    """decode_linear's `few` for rows using pool slots ids (-1: no adapter), as one list: the
    distinct slots in order of first use, -1 after the last (FEW), then each row's index among
    them (-1: none). Raises ValueError past FEW distinct adapters."""
    distinct = [s for s in dict.fromkeys(ids) if s >= 0]
    if len(distinct) > FEW:
        raise ValueError(f"{len(distinct)} distinct adapters: few takes at most {FEW}")
    return distinct + [-1] * (FEW - len(distinct)) + [distinct.index(s) if s >= 0 else -1 for s in ids]


def few_adapters(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots int32 [FEW], row_u int32 [M]) of decode_linear's `few` for ids [M] (`few_table`)."""
    table = torch.tensor(few_table(ids.tolist()), dtype=torch.int32).to(ids.device)
    return table[:FEW], table[FEW:]


@torch.library.custom_op("tasktune::decode_linear", mutates_args=())
def decode_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                     norm_weight: torch.Tensor | None, eps: float, swiglu: bool, A: torch.Tensor | None,
                     B: torch.Tensor | None, scaling: torch.Tensor | None, ids: torch.Tensor | None,
                     bounds: list[int], delta: torch.Tensor | None = None, delta_rms: bool = True,
                     few_slots: torch.Tensor | None = None, few_rows: torch.Tensor | None = None) -> torch.Tensor:
    """`decode_linear` as an operator torch.compile keeps whole (the decoder calls this one)."""
    return decode_linear(x, weight, bias, residual, norm=None if norm_weight is None else (norm_weight, eps),
                         swiglu=swiglu, lora=None if A is None else (A, B, scaling, ids), bounds=tuple(bounds),
                         delta=delta, delta_rms=delta_rms, few=None if few_slots is None else (few_slots, few_rows))


@decode_linear_op.register_fake
def _(x, weight, bias, residual, norm_weight, eps, swiglu, A, B, scaling, ids, bounds, delta=None, delta_rms=True,
      few_slots=None, few_rows=None):
    return x.new_empty(x.shape[0], weight.shape[0] // 2 if swiglu else weight.shape[0])
