"""Punica-style BGMV LoRA kernels in Triton, for the serving decode step.

`lora_apply_(y, x, A, B, scaling, ids)` adds each row's LoRA update to the base output in
place, the function `y + lora_delta_gathered(x, A, B, scaling, ids)` of `ops.py` computes,
without the gathered copies: `index_select` writes N copies of the adapters to memory
and reads them back, while these kernels read each row's adapter where it lies (rows
sharing an adapter hit the L2 cache).

Two phases, with fixed grids for given shapes, no host sync (CUDA-graph capturable):
- shrink, (N, S) programs: (n, s) reduces a contiguous split of d_in,
  h_part[n, s, :] = A[ids[n], :, split] @ x[n, split], fp32 accumulation. Splitting d_in
  gives a decode batch of 32 rows enough programs to keep the memory system busy.
- expand, (N, d_out tiles) programs: (n, t) sums h_part[n, :, :] over the splits (a
  fixed order, so the result is deterministic, unlike atomic adds) and does
  y[n, tile] += scaling[ids[n]] * B[ids[n], tile, :] @ h[n], rounding once to y's dtype.
Two launches: with both in one (expand programs after the shrink programs in the grid,
waiting on a counter for them) the decode step was slower on an H200 (session 8: 16,292 /
15,396 tok/s at 4 / 32 adapters against 20,208 / 19,285; the waiting programs hold SMs).
Rows with id < 0 skip both phases: they never read an adapter, so a non-finite value in
some adapter reaches only the rows that use it.

Fused linears (qkv_proj, gate_up_proj: modules that share their input) take one launch
pair for all their modules: A stacks the modules' A along its rank axis
([n_slots, M * rank, d_in]: one shrink reads x once for all of them) and B stacks their B
along d_out ([n_slots, d_out, rank]); output columns from bounds[i] on belong to module
i + 1, whose rows of h start at (i + 1) * rank. Four launch pairs per decoder layer
instead of seven.

Limits: r <= 64 (the rank is padded to a power of two >= 16 in registers, masked on
load); A, B, x, y each bf16, fp16 or fp32 (all upcast to fp32 on load, y rounded once);
scaling any float dtype; ids int32 or int64 in [-1, n_slots) (not checked, that would
need a sync: an id past the stack reads out of bounds).

Triton is optional: without it this module still imports, `available()` is False and the
caller uses the torch path. On the CPU the kernels run under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs and CI: the caller falls back to torch
    triton = None

MAX_RANK = 64
TILE = 4096  # elements of A or B one program holds per step ([R, BLOCK_K] or [BLOCK_N, R])
# shrink: split d_in until N * S reaches about this many programs, at most MAX_SPLIT (the
# expand re-reads all S partial sums); expand: elements of B one program holds ([BLOCK_N, R]).
# Alone, 1024 programs and 2048 were fastest (lora_kernel_bench, session 4); in the decode
# step, where the pair runs beside the LATE fused linear, fatter expand programs are (H200,
# 32 rows, tok/s at 4 / 32 adapters, each pair of figures from one run: session 10, 256
# programs and 8192 elements against session 9's 1024 and 2048: 23,200 / 22,162 against
# 22,616 / 21,451; expand tiles of up to 512 columns instead of 256: 23,942 / 22,624 against
# 23,120 / 22,098; session 11, 512 shrink programs instead of 256: 25,456 / 24,132 against
# 24,666 / 23,558, 1024: 25,387 / 23,997; a shrink TILE of 2048: 23,844 / 22,898)
TARGET_PROGRAMS = 512
MAX_SPLIT = 32
EXPAND_TILE = 8192
EXPAND_MAX_N = 512  # ... and at most this many d_out columns


def available(device: torch.device | str | None = None) -> bool:
    """Whether `lora_apply_` can run on tensors of `device` (default: the GPU if any):
    Triton is installed and the device is CUDA, or the Triton interpreter is on."""
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    on_gpu = device is None or torch.device(device).type == "cuda"
    return on_gpu and torch.cuda.is_available()


# Programmatic dependent launch (Hopper+): the decode kernels of serve/ launch with it and
# wait for the previous kernel inside (`tl.extra.cuda.gdc_wait`), so a kernel's launch overlaps
# the previous kernel's tail. Benchmarks flip this to time without it;
# TASKTUNE_PDL=0 turns it off (a driver or graph runtime without programmatic edges).
PDL = os.environ.get("TASKTUNE_PDL", "1") != "0"
# Where the decode kernels wait and let the next launch (session 10; serve-bench variants
# flip them): EARLY: a kernel lets the next one launch right after its own wait, not after
# its main loop, so the next kernel's programs are on the SMs while this one works; LATE: a
# fused linear whose LoRA delta comes from the BGMV pair before it runs its main loop
# before the wait (its input was made before that pair's shrink) and waits in the
# epilogue, where it reads the delta, so the linear's GEMM overlaps the pair.
# The rule that keeps this safe: before its wait a kernel reads only step inputs, weights,
# or data made before its predecessor's predecessor; the BGMV expand (followed by a LATE
# linear) is the one kernel that lets the next launch before its own wait, and in every
# kernel some program waits, so a kernel ends after its predecessor.
PDL_EARLY = LATE_WAIT = True


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 stands in elsewhere: an H100 / H200,
    so launch shapes under the interpreter match the GPU this project tunes for)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def pdl_launch(device: torch.device) -> dict:
    """A decode kernel's PDL arguments on `device`: PDL (it waits for the previous kernel),
    EARLY (it lets the next launch right after that wait: PDL_EARLY) and the launch flag."""
    pdl = use_pdl(device)
    return {"PDL": pdl, "EARLY": pdl and PDL_EARLY, **({"launch_pdl": True} if pdl else {})}


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch: PDL is on, a
    real GPU of compute capability 9 or more (never under the interpreter)."""
    if not PDL or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device())[0] >= 9


_counters: dict[tuple[str, torch.device], torch.Tensor] = {}


def counter_buffer(owner: str, device: torch.device, size: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Zeroed counters for `owner`'s kernels on `device` (split-K and split-attention "last
    to finish" counts; other per-launch scratch such as triton_lm_head's int64 maxima),
    which every launch leaves at zero: no memset per launch. One fixed tensor per owner and
    device, never reallocated (CUDA graphs keep its pointer)."""
    key = (owner, device)
    if key not in _counters:
        _counters[key] = torch.zeros(size, dtype=dtype, device=device)
    return _counters[key]


if triton is not None:

    @triton.jit
    def _shrink(x_ptr, a_ptr, h_ptr, nw_ptr, eps, n, s, slot, d_in, r, stride_xn, S,
                R: tl.constexpr, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr, NORM: tl.constexpr,
                RMS: tl.constexpr):
        """h_part[n, s, :] = A[slot, :, split s] @ act(x[n, split s]) in fp32 (act: x, or
        RMSNorm(x) * weight with NORM, the fused decode linear's rounding; without RMS, x *
        weight: the consumer scales by 1 / rms)."""
        offs_r = tl.arange(0, R)
        offs_k = tl.arange(0, BLOCK_K)
        a_rows = a_ptr + slot * r * d_in + offs_r[:, None] * d_in  # [R, 1] row starts of A[slot]
        acc = tl.zeros((R,), dtype=tl.float32)
        k_start = s * K_SPLIT
        for k0 in range(0, K_SPLIT, BLOCK_K):
            k = k_start + k0 + offs_k  # [BLOCK_K]
            k_ok = k < d_in
            xv = tl.load(x_ptr + n * stride_xn + k, mask=k_ok, other=0.0)  # [BLOCK_K]
            if NORM:  # x * weight rounded to x's dtype, as triton_linear's load_act
                xv = (xv.to(tl.float32) * tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(tl.float32)).to(xv.dtype)
            a = tl.load(a_rows + k[None, :], mask=(offs_r[:, None] < r) & k_ok[None, :], other=0.0)  # [R, BLOCK_K]
            acc += tl.sum(a.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)  # [R]
        if NORM and RMS:  # each split scales its part by the whole row's 1 / rms (the row is short: read again)
            ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, d_in, BLOCK_K):
                xf = tl.load(x_ptr + n * stride_xn + k0 + offs_k, mask=k0 + offs_k < d_in, other=0.0).to(tl.float32)
                ss += xf * xf
            acc = acc / tl.sqrt(tl.sum(ss, axis=0) / d_in + eps)
        tl.store(h_ptr + (n * S + s) * R + offs_r, acc)

    @triton.jit
    def _load_b(b_ptr, slot, t, d_out, r, stride_bs, stride_bo, stride_br, R_MODULE: tl.constexpr, BLOCK_N: tl.constexpr):
        """Tile t of B[slot] ([BLOCK_N, R_MODULE], zeros for slot < 0): adapter weights, not the
        shrink's output, so it can be read before any wait."""
        offs_o = t * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, R_MODULE)
        has = (tl.zeros((BLOCK_N,), dtype=tl.int64) + slot) >= 0  # (a vector: a scalar mask fails in the interpreter)
        b_ptrs = b_ptr + tl.maximum(slot, 0) * stride_bs + offs_o[:, None] * stride_bo + offs_r[None, :] * stride_br
        return tl.load(b_ptrs, mask=((offs_o < d_out) & has)[:, None] & (offs_r < r)[None, :], other=0.0)

    @triton.jit
    def _expand(h_ptr, b, scale, y_ptr, n, t, slot, d_out, r, stride_yn, bound1, bound2,
                R: tl.constexpr, R_MODULE: tl.constexpr, BLOCK_N: tl.constexpr, S: tl.constexpr,
                MODULES: tl.constexpr, STORE: tl.constexpr):
        """y[n, tile t] += scale * b @ h[n] (the shrink's S parts summed in a fixed order; each
        column takes its module's rows of h), rounded once to y's dtype; STORE: y (fp32) = the
        delta itself, 0 for slot < 0 (others leave rows without an adapter untouched)."""
        offs_o = t * BLOCK_N + tl.arange(0, BLOCK_N)
        o_ok = offs_o < d_out
        y_ptrs = y_ptr + n * stride_yn + offs_o
        if slot < 0:
            if STORE:
                tl.store(y_ptrs, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=o_ok)
        else:
            offs_r = tl.arange(0, R_MODULE)
            r_ok = offs_r < r
            h0 = tl.zeros((R_MODULE,), dtype=tl.float32)  # each module's h = A_m @ x: rows m * r ... of h
            h1 = tl.zeros((R_MODULE,), dtype=tl.float32)
            h2 = tl.zeros((R_MODULE,), dtype=tl.float32)
            for s in range(S):  # the shrink's partial sums, in a fixed order
                row = h_ptr + (n * S + s) * R + offs_r
                h0 += tl.load(row, mask=r_ok, other=0.0, cache_modifier=".cg")
                if MODULES > 1:
                    h1 += tl.load(row + r, mask=r_ok, other=0.0, cache_modifier=".cg")
                if MODULES > 2:
                    h2 += tl.load(row + 2 * r, mask=r_ok, other=0.0, cache_modifier=".cg")
            h = tl.broadcast_to(h0[None, :], (BLOCK_N, R_MODULE))
            if MODULES > 1:  # each column takes the h of the module it belongs to
                module = (offs_o >= bound1).to(tl.int32) + (offs_o >= bound2).to(tl.int32)  # [BLOCK_N]
                h = tl.where(module[:, None] == 1, h1[None, :], h)
                h = tl.where(module[:, None] == 2, h2[None, :], h)
            delta = tl.sum(b.to(tl.float32) * h, axis=1) * scale  # [BLOCK_N]
            if STORE:
                tl.store(y_ptrs, delta, mask=o_ok)
            else:
                y = tl.load(y_ptrs, mask=o_ok, other=0.0)
                tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=o_ok)

    @triton.jit
    def bgmv_shrink(
        x_ptr, a_ptr, ids_ptr, h_ptr,  # x: [N, d_in], A: [n_slots, r, d_in], ids: [N], h: [N, S, R] fp32
        nw_ptr, eps,  # NORM: the input is RMSNorm(x) * nw (as the fused decode linear computes it)
        d_in, r, stride_xn,
        R: tl.constexpr, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr,  # K_SPLIT: a multiple of BLOCK_K
        PDL: tl.constexpr = False, NORM: tl.constexpr = False, EARLY: tl.constexpr = False,
        RMS: tl.constexpr = True,  # NORM: times 1 / rms(x) too (else the delta's consumer applies it)
    ):
        n = tl.program_id(0)
        s = tl.program_id(1)
        slot = tl.load(ids_ptr + n).to(tl.int64)  # the step's inputs: readable before the PDL wait
        if PDL:
            tl.extra.cuda.gdc_wait()
            if EARLY:  # the expand may launch now: it reads its B tile, then waits for this grid
                tl.extra.cuda.gdc_launch_dependents()
        if slot >= 0:
            _shrink(x_ptr, a_ptr, h_ptr, nw_ptr, eps, n, s, slot, d_in, r, stride_xn, tl.num_programs(1), R, BLOCK_K,
                    K_SPLIT, NORM, RMS)
        if PDL and not EARLY:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def bgmv_expand(
        h_ptr, b_ptr, scaling_ptr, ids_ptr, y_ptr,  # h: [N, S, R] fp32, B: [n_slots, d_out, r], y: [N, d_out]
        d_out, r, stride_yn, bound1, bound2,  # columns >= bound_i belong to module i (fused linears)
        stride_bs, stride_bo, stride_br,  # B's strides (any; the pool's [n_slots, d_out, r] is contiguous)
        R: tl.constexpr, R_MODULE: tl.constexpr, BLOCK_N: tl.constexpr, S: tl.constexpr, MODULES: tl.constexpr,
        PDL: tl.constexpr = False, STORE: tl.constexpr = False,  # STORE: y = the delta (fp32; 0 for no adapter)
        EARLY: tl.constexpr = False,  # the next kernel may launch before this one's wait (a LATE fused linear)
    ):
        n = tl.program_id(0)
        t = tl.program_id(1)
        slot = tl.load(ids_ptr + n).to(tl.int64)
        b = _load_b(b_ptr, slot, t, d_out, r, stride_bs, stride_bo, stride_br, R_MODULE, BLOCK_N)
        scale = tl.load(scaling_ptr + tl.maximum(slot, 0)).to(tl.float32)
        if PDL:
            if EARLY:  # the delta's consumer reads before its own wait only what this kernel's
                tl.extra.cuda.gdc_launch_dependents()  # predecessor (the shrink) had waited for
            tl.extra.cuda.gdc_wait()
        _expand(h_ptr, b, scale, y_ptr, n, t, slot, d_out, r, stride_yn, bound1, bound2, R, R_MODULE, BLOCK_N, S,
                MODULES, STORE)


def _pow2_at_least(v: int, lo: int) -> int:
    p = lo
    while p < v:
        p *= 2
    return p


@dataclass(frozen=True)
class LaunchConfig:
    R: int  # the rows of A (every module's rank) padded to a power of two >= 16
    R_MODULE: int  # one module's rank padded likewise
    BLOCK_K: int  # shrink: d_in elements per step
    K_SPLIT: int  # shrink: d_in elements per program (a multiple of BLOCK_K)
    S: int  # shrink: programs per row, cdiv(d_in, K_SPLIT)
    BLOCK_N: int  # expand: d_out elements per program


@functools.lru_cache(maxsize=None)
def launch_config(n_rows: int, d_in: int, d_out: int, r: int, modules: int = 1) -> LaunchConfig:
    """The fixed launch configuration for these shapes (a function of the shapes alone);
    r: one module's rank, A holding `modules` of them."""
    R = _pow2_at_least(r * modules, 16)
    R_MODULE = _pow2_at_least(r, 16)
    block_k = max(16, min(256, TILE // R))  # R up to 256 (a fused qkv of rank 64): [R, BLOCK_K] stays TILE
    blocks = triton.cdiv(d_in, block_k)
    want = max(1, min(MAX_SPLIT, triton.cdiv(TARGET_PROGRAMS, n_rows)))
    per_split = triton.cdiv(blocks, want)  # BLOCK_K blocks per program
    return LaunchConfig(R=R, R_MODULE=R_MODULE, BLOCK_K=block_k, K_SPLIT=per_split * block_k,
                        S=triton.cdiv(blocks, per_split), BLOCK_N=max(32, min(EXPAND_MAX_N, EXPAND_TILE // R_MODULE)))


def check_lora_args(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor,
                    ids: torch.Tensor, bounds: tuple[int, ...]) -> None:
    """The arguments every LoRA launch pair takes (`lora_apply_`, triton_sgmv.sgmv_apply_):
    shapes of up to 3 modules, rank, memory layout, one device; a ValueError naming them."""
    n_rows, d_in = x.shape
    n_slots = A.shape[0]
    d_out, r = B.shape[1], B.shape[2]
    modules = len(bounds) + 1
    if (modules > 3 or A.shape != (n_slots, modules * r, d_in) or B.shape[0] != n_slots or y.shape != (n_rows, d_out)
            or list(bounds) != sorted(bounds) or any(not 0 < b < d_out for b in bounds)):
        raise ValueError(f"shapes: y {tuple(y.shape)}, x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, "
                         f"bounds {tuple(bounds)}")
    if r > MAX_RANK:
        raise ValueError(f"rank {r} > {MAX_RANK}")
    if not all(t.is_contiguous() for t in (A, scaling, ids)) or x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("A, scaling, ids must be contiguous, x and y unit-stride along the feature dim")
    if len({t.device for t in (y, x, A, B, scaling, ids)}) != 1:
        raise ValueError("all tensors must be on one device")


def lora_apply_(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor,
    bounds: tuple[int, ...] = (), *, norm: tuple[torch.Tensor, float] | None = None, rms: bool = True,
    store: bool = False, _h: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[n] += scaling[ids[n]] * B[ids[n]] @ (A[ids[n]] @ x[n]) for rows with ids[n] >= 0, in
    place; rows with -1 are left untouched. Returns y.
    y: [N, d_out], x: [N, d_in], A: [n_slots, r, d_in], B: [n_slots, d_out, r], scaling: [n_slots],
    ids: [N] int. y and x may be row-strided views (unit stride along the feature dim); B
    may have any strides.
    A fused linear of M modules (bounds: the first output column of modules 2..M, at most
    3 modules): A: [n_slots, M * r, d_in], B: [n_slots, d_out, r], and column c uses the
    rank-r block of A of the module it belongs to.
    norm = (weight [d_in], eps): the adapters read RMSNorm(x) * weight instead of x; with rms
    False, x * weight (rounded to x's dtype), whose delta the caller scales by 1 / rms(x).
    store: y (fp32) becomes the delta itself, 0 on rows without an adapter, instead of
    having it added (`lora_delta`: what the fused decode linear adds in its epilogue)."""
    check_lora_args(y, x, A, B, scaling, ids, bounds)
    n_rows, d_in = x.shape
    rows, d_out, r, modules = A.shape[1], B.shape[1], B.shape[2], len(bounds) + 1
    if n_rows == 0:
        return y
    b1, b2 = (list(bounds) + [d_out, d_out])[:2]
    cfg = launch_config(n_rows, d_in, d_out, r, modules)
    h = torch.empty(n_rows, cfg.S, cfg.R, dtype=torch.float32, device=x.device) if _h is None else _h  # A @ x parts
    launch = pdl_launch(x.device)  # the expand launches while the shrink finishes (Hopper)
    if norm is not None and (norm[0].shape != (d_in,) or not norm[0].is_contiguous()):
        raise ValueError(f"norm weight {tuple(norm[0].shape)} for {d_in} inputs")
    if store and y.dtype != torch.float32:
        raise ValueError(f"store: the delta is float32, not {y.dtype}")
    nw, eps = norm if norm is not None else (x, 0.0)
    tiles = triton.cdiv(d_out, cfg.BLOCK_N)
    bgmv_shrink[(n_rows, cfg.S)](
        x, A, ids, h, nw, eps, d_in, rows, x.stride(0), R=cfg.R, BLOCK_K=cfg.BLOCK_K, K_SPLIT=cfg.K_SPLIT,
        NORM=norm is not None, RMS=rms, **launch,
    )
    bgmv_expand[(n_rows, tiles)](
        h, B, scaling, ids, y, d_out, r, y.stride(0), b1, b2, *B.stride(), R=cfg.R, R_MODULE=cfg.R_MODULE, BLOCK_N=cfg.BLOCK_N,
        S=cfg.S, MODULES=modules, STORE=store, **launch,
    )
    return y


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor,
               bounds: tuple[int, ...] = (), norm: tuple[torch.Tensor, float] | None = None,
               rms: bool = True) -> torch.Tensor:
    """Each row's LoRA delta, scaling[ids[n]] * B[ids[n]] @ (A[ids[n]] @ act(x[n])), as a new
    fp32 [N, d_out] tensor (0 on rows without an adapter): the fused decode linear adds it to
    its fp32 accumulator before rounding, SwiGLU and the residual (triton_linear). act: x,
    or RMSNorm(x) * weight for norm = (weight, eps) (rms False: x * weight, the fused linear
    scaling projection and delta by 1 / rms together). Shapes as `lora_apply_`.
    The shrink's partial sums live in the same allocation, after the delta, so they stay
    allocated while the delta does: a LATE fused linear (PDL_EARLY) runs beside this pair
    and must not be handed their memory for its split-K workspace."""
    n_rows, d_out = x.shape[0], B.shape[1]
    cfg = launch_config(n_rows, x.shape[1], d_out, B.shape[2], len(bounds) + 1) if n_rows else None
    at = -(-n_rows * d_out // 64) * 64  # the partial sums start 256-byte aligned
    buf = torch.empty(at + (n_rows * cfg.S * cfg.R if cfg else 0), dtype=torch.float32, device=x.device)
    y = buf[:n_rows * d_out].view(n_rows, d_out)
    h = buf[at:].view(n_rows, cfg.S, cfg.R) if cfg else None
    return lora_apply_(y, x, A, B, scaling, ids, bounds, norm=norm, rms=rms, store=True, _h=h)


@torch.library.custom_op("tasktune::bgmv_lora", mutates_args=("y",))
def bgmv_lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor,
              ids: torch.Tensor, bounds: list[int]) -> None:
    """`lora_apply_` as an operator torch.compile keeps whole (an opaque call that writes y)
    instead of tracing into the launches; the decoder calls this one."""
    lora_apply_(y, x, A, B, scaling, ids, tuple(bounds))


@bgmv_lora.register_fake
def _(y, x, A, B, scaling, ids, bounds) -> None:
    return None


@torch.library.custom_op("tasktune::bgmv_delta", mutates_args=())
def bgmv_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor,
               bounds: list[int], norm_weight: torch.Tensor | None, eps: float, rms: bool = True) -> torch.Tensor:
    """`lora_delta` as an operator torch.compile keeps whole."""
    return lora_delta(x, A, B, scaling, ids, tuple(bounds), None if norm_weight is None else (norm_weight, eps), rms)


@bgmv_delta.register_fake
def _(x, A, B, scaling, ids, bounds, norm_weight, eps, rms=True):
    return x.new_empty(x.shape[0], B.shape[1], dtype=torch.float32)

