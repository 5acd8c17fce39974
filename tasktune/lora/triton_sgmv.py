"""Segmented LoRA kernels (Punica's SGMV) in Triton, for padded prefills on the GPU.

A padded prefill (serve/prefill_graphs.py) lays out S sequences as S segments of `seg`
rows each, every row of a segment under the segment's adapter. The BGMV pair
(triton_ops.py) reads each row's adapter for itself: right for a decode step's 32 rows,
but inside one 256-token prefill graph its expand read each B 256 times (1.4 of the
step's 2.8 ms, H200, session 14). Here a program takes a tile of BLOCK_M rows of one
segment, reads its adapter's A or B tile once and multiplies on the tensor cores:

- shrink, (row tiles, K splits) programs: h_part[tile, k, :, :] = x[tile, split k] @
  A[slot, :, split k]^T, accumulated in fp32 (x and A in their dtype: exact products);
- expand, (row tiles, column tiles) programs: y[tile, cols] += scaling[slot] * (sum_k
  h_part[tile, k]) @ B[slot, cols, :]^T (the K parts summed in fp32 in a fixed order: no
  atomics, the same result every replay; h then rounded to B's dtype for the tensor
  cores, as PEFT rounds A @ x in a bf16 model), accumulated in fp32, rounded once to y's
  dtype.

Fused linears take one pair for all their modules, as the BGMV pair does: A stacks the
modules' ranks ([slots, modules * r, d_in]) and columns from bounds[i] on take module
i + 1's rank block of h. Segments with slot -1 are skipped (their rows untouched).
Fixed grids for given shapes and no host sync: CUDA-graph capturable. Row counts and K
splits are runtime arguments, so every prefill shape shares a few compiled kernels (one
per tile height and module count), not one per shape each graph capture compiles. The caller
guarantees that no row tile straddles two segments (`block_m(seg)` divides seg).
"""

from __future__ import annotations

import functools

import torch

from tasktune.lora.triton_ops import _pow2_at_least, check_lora_args, triton

TARGET_PROGRAMS = 264  # shrink: split d_in until row tiles x splits reach about this (2 a program an H100 / H200 SM),
MAX_SPLIT = 8  # ... in at most this many parts, which every expand program sums (H200, a 256-token prefill, 4
# row tiles: up to 66 parts made the expand 10.8 us a launch, 1.04 of the step's 2.6 ms of kernels)
BLOCK_K = 64
BLOCK_N = 128


def block_m(seg: int) -> int:
    """Rows a program takes: the largest power of two <= 64 dividing `seg`, 0 if below 16
    (the kernels need tiles of 16 rows or more: the caller then takes the BGMV pair)."""
    b = 64
    while b >= 16 and seg % b:
        b //= 2
    return b if b >= 16 else 0


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _sgmv_shrink(x_ptr, a_ptr, seg_ids_ptr, h_ptr, N, d_in, rows_a, stride_xn, SEG, K_SPLIT,
                     R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FP32: tl.constexpr):
        tile, s = tl.program_id(0), tl.program_id(1)
        slot = tl.load(seg_ids_ptr + tile * BLOCK_M // SEG).to(tl.int64)
        if slot >= 0:
            offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_r = tl.arange(0, R)
            m_ok, r_ok = offs_m < N, offs_r < rows_a
            acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
            for k0 in range(0, K_SPLIT, BLOCK_K):
                k = s * K_SPLIT + k0 + tl.arange(0, BLOCK_K)
                k_ok = k < d_in
                xv = tl.load(x_ptr + offs_m[:, None] * stride_xn + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                             other=0.0)  # [BLOCK_M, BLOCK_K]
                at = tl.load(a_ptr + (slot * rows_a + offs_r[None, :]) * d_in + k[:, None],
                             mask=r_ok[None, :] & k_ok[:, None], other=0.0)  # A^T tile [BLOCK_K, R]
                if FP32:  # fp32 inputs (not tf32), and the interpreter, whose bf16 dot is wrong (triton 3.x)
                    acc = tl.dot(xv.to(tl.float32), at.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xv, at, acc)
            rows = (tile * tl.num_programs(1) + s) * BLOCK_M + tl.arange(0, BLOCK_M)
            tl.store(h_ptr + rows[:, None] * R + offs_r[None, :], acc)

    @triton.jit
    def _h(h_ptr, tile, col0, offs_r, r_ok, S, BLOCK_M: tl.constexpr, R: tl.constexpr):
        """h[tile rows, col0 + offs_r] summed over the shrink's S parts in a fixed order -> fp32 [BLOCK_M, R_MODULE]."""
        rows = (tile * S * BLOCK_M + tl.arange(0, BLOCK_M))[:, None] * R + col0 + offs_r[None, :]
        h = tl.load(h_ptr + rows, mask=r_ok[None, :], other=0.0)
        for s in range(1, S):
            h += tl.load(h_ptr + rows + s * BLOCK_M * R, mask=r_ok[None, :], other=0.0)
        return h

    @triton.jit
    def _dot(h, bt, acc, FP32: tl.constexpr):
        """acc + h @ bt: in IEEE fp32 (fp32 weights, the interpreter), else on the tensor
        cores with h rounded to B's dtype (as PEFT's bf16 LoRA rounds its A @ x)."""
        if FP32:
            return tl.dot(h, bt.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(h.to(bt.dtype), bt, acc)

    @triton.jit
    def _sgmv_expand(h_ptr, b_ptr, scaling_ptr, seg_ids_ptr, y_ptr, N, d_out, r, stride_yn, bound1, bound2,
                     stride_bs, stride_bo, stride_br, SEG, S,
                     R: tl.constexpr, R_MODULE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     MODULES: tl.constexpr, FP32: tl.constexpr):
        tile, t = tl.program_id(0), tl.program_id(1)
        slot = tl.load(seg_ids_ptr + tile * BLOCK_M // SEG).to(tl.int64)
        if slot >= 0:
            offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_o = t * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_r = tl.arange(0, R_MODULE)
            m_ok, o_ok, r_ok = offs_m < N, offs_o < d_out, offs_r < r
            bt = tl.load(b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_o[None, :] * stride_bo,
                         mask=r_ok[:, None] & o_ok[None, :], other=0.0)  # B^T tile [R_MODULE, BLOCK_N]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            c0, c1 = t * BLOCK_N, tl.minimum(t * BLOCK_N + BLOCK_N, d_out) - 1  # the tile's first and last column
            first = (c0 >= bound1).to(tl.int32) + (c0 >= bound2).to(tl.int32)  # ... and their modules
            if first == (c1 >= bound1).to(tl.int32) + (c1 >= bound2).to(tl.int32):  # one module (most tiles)
                acc = _dot(_h(h_ptr, tile, first * r, offs_r, r_ok, S, BLOCK_M, R), bt, acc, FP32)
            else:  # a tile across a bound: each module's product on its own columns
                module = (offs_o >= bound1).to(tl.int32) + (offs_o >= bound2).to(tl.int32)
                for m in tl.static_range(MODULES):
                    b_m = tl.where((module == m)[None, :], bt, tl.zeros_like(bt))
                    acc = _dot(_h(h_ptr, tile, m * r, offs_r, r_ok, S, BLOCK_M, R), b_m, acc, FP32)
            scale = tl.load(scaling_ptr + slot).to(tl.float32)
            y_ptrs = y_ptr + offs_m[:, None] * stride_yn + offs_o[None, :]
            ok = m_ok[:, None] & o_ok[None, :]
            y = tl.load(y_ptrs, mask=ok, other=0.0)
            tl.store(y_ptrs, (y.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=None)
def _splits(tiles: int, d_in: int) -> int:
    """K splits of the shrink: enough programs for the GPU, each at least one BLOCK_K."""
    blocks = triton.cdiv(d_in, BLOCK_K)
    return triton.cdiv(blocks, triton.cdiv(blocks, max(1, min(blocks, MAX_SPLIT, triton.cdiv(TARGET_PROGRAMS, tiles)))))


def sgmv_apply_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor,
                seg_ids: torch.Tensor, seg: int, bounds: tuple[int, ...] = ()) -> torch.Tensor:
    """y[n] += scaling[s] * B[s] @ (A[s] @ x[n]) with s = seg_ids[n // seg] for segments with
    an adapter (s >= 0), in place; returns y. y: [N, d_out], x: [N, d_in] (N a multiple of
    seg, unit stride along the features), A: [slots, modules * r, d_in], B: [slots, d_out, r],
    scaling: [slots], seg_ids: [N / seg] int; bounds as triton_ops.lora_apply_."""
    check_lora_args(y, x, A, B, scaling, seg_ids, bounds)
    n_rows, d_in = x.shape
    rows_a, d_out, r, modules = A.shape[1], B.shape[1], B.shape[2], len(bounds) + 1
    bm = block_m(seg)
    if seg <= 0 or not bm or n_rows % seg or seg_ids.shape != (n_rows // seg,):
        raise ValueError(f"SGMV: {n_rows} rows as segments {tuple(seg_ids.shape)} of {seg} rows (a multiple of 16)")
    if n_rows == 0:
        return y
    R, R_MODULE = _pow2_at_least(rows_a, 16), _pow2_at_least(r, 16)
    tiles = n_rows // bm
    S = _splits(tiles, d_in)
    k_split = triton.cdiv(triton.cdiv(d_in, BLOCK_K), S) * BLOCK_K
    h = torch.empty(tiles * S * bm, R, dtype=torch.float32, device=x.device)
    _sgmv_shrink[(tiles, S)](x, A, seg_ids, h, n_rows, d_in, rows_a, x.stride(0), seg, k_split, R=R, BLOCK_M=bm,
                             BLOCK_K=BLOCK_K, FP32=x.device.type != "cuda" or x.dtype == torch.float32)
    b1, b2 = (list(bounds) + [d_out, d_out])[:2]
    _sgmv_expand[(tiles, triton.cdiv(d_out, BLOCK_N))](
        h, B, scaling, seg_ids, y, n_rows, d_out, r, y.stride(0), b1, b2, *B.stride(), seg, S, R=R, R_MODULE=R_MODULE,
        BLOCK_M=bm, BLOCK_N=BLOCK_N, MODULES=modules, FP32=x.device.type != "cuda" or B.dtype == torch.float32)
    return y


@torch.library.custom_op("tasktune::sgmv_lora", mutates_args=("y",))
def sgmv_lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor,
              seg_ids: torch.Tensor, seg: int, bounds: list[int]) -> None:
    """`sgmv_apply_` as an operator torch.compile keeps whole; the decoder calls this one."""
    sgmv_apply_(y, x, A, B, scaling, seg_ids, seg, tuple(bounds))


@sgmv_lora.register_fake
def _(y, x, A, B, scaling, seg_ids, seg, bounds) -> None:
    return None
