"""The greedy decode step's tail in one Triton launch: final RMSNorm, LM head, argmax.

The decode step ended in three launches: the final norm (an eager kernel), the LM head
(cuBLAS: for Qwen2.5-0.5B a [32, 896] x [151,936, 896]^T product, 272 MB of weights, 72 us
on an H200) and the argmax (triton_argmax.py, 8.6 us). Here each program computes a block
of BLOCK_N vocabulary rows for every batch row, with the norm folded into its loads as the
fused decode linears fold it (x * weight, then 1 / rms on the fp32 product:
triton_linear_blocks.k_partial), stores the logits and takes each row's maximum over its
block. The programs combine their maxima by atomic max on one int64 a row: the value's
order-preserving bits above the complement of its index, so the largest value wins and,
among equal ones, the smallest index: the first maximal index, as torch.argmax returns it
(a NaN counts as the maximum, as there). Programs spread their atomics over SLOTS copies;
the last program to finish reduces the copies, writes the tokens and leaves them and its
counter at zero. Given the step's input rows it also feeds the next step, as
triton_argmax.argmax_rows does.

`lm_head_argmax(x, norm_weight, eps, weight)` -> (logits [M, V] in x's dtype, argmax int64
[M]); the argmax is exact for the logits it returns. Runs on the CPU under
TRITON_INTERPRET=1 (tests).

Measured on an H200 (session 12, bench/lm_head_bench.py, Qwen2.5-0.5B's tail at 32 rows):
80.9-83.2 us against 86.7-90.1 for the three launches, but its product reads the weights
at ~3.3 TB/s where cuBLAS's alone reaches ~3.8 (72 us). In the serve bench's decode step it
was a wash (+0.3% tok/s without adapters against `cuda_graphs.FUSED_HEAD` off). Tried and
removed: weight tiles by TMA (79.5 us, +0.3% in the serve bench); programs taking runs of
blocks, 1-4 programs an SM (one wave, as cuBLAS's 384-row tiles make): 88-100 us.
"""
from __future__ import annotations

import torch

from tasktune.lora.triton_ops import _pow2_at_least, available, counter_buffer, pdl_launch, triton

__all__ = ["available", "lm_head_argmax", "usable"]

BLOCK_N = 128  # vocabulary rows a program
BLOCK_K = 64  # (bench/lm_head_bench.py on an H200: 82.7 us with 128 x 64 tiles, 126.7 with 128 x 128)
SLOTS = 32  # copies of the per-row maxima the programs' atomics spread over
NUM_WARPS, NUM_STAGES = 4, 3
MAX_ROWS = 64

if triton is not None:
    import triton.language as tl

    from tasktune.serve.triton_argmax import _first_max
    from tasktune.serve.triton_linear_blocks import k_partial

    @triton.jit
    def _order_key(value, index):
        """An int64 that orders as (value, -index): the float's bits made unsigned-monotone
        (negative values flipped, positive ones above them; NaN as one value above +inf)."""
        bits = tl.where(value != value, 0x7FC00000, value.to(tl.int32, bitcast=True))
        u = tl.where(bits < 0, ~bits, bits | (-2147483648)).to(tl.int64) & 0xFFFFFFFF
        return (u << 31) | (2147483647 - index).to(tl.int64)  # 31 bits of index under the value's 32

    @triton.jit
    def _lm_head_argmax(x_ptr, nw_ptr, w_ptr, y_ptr, out_ptr, keys_ptr, cnt_ptr, tok_ptr, pos_ptr, act_ptr,
                        M, V, eps, stride_xm, stride_ym,
                        K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N_: tl.constexpr,
                        BLOCK_K_: tl.constexpr, SLOTS_: tl.constexpr, NEXT: tl.constexpr, UPCAST: tl.constexpr,
                        PDL: tl.constexpr, EARLY: tl.constexpr = False):
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        offs_n = pid * BLOCK_N_ + tl.arange(0, BLOCK_N_)
        n_ok = offs_n < V
        if PDL:  # launched early: the previous kernel (the last layer) made x
            tl.extra.cuda.gdc_wait()
            if EARLY:
                tl.extra.cuda.gdc_launch_dependents()
        acc, ss = k_partial(w_ptr, x_ptr, nw_ptr, 0, offs_n, n_ok, offs_m, m_ok, 0, stride_xm, K, BLOCK_N_, BLOCK_M,
                            BLOCK_K_, K_PAD, True, UPCAST)
        rstd = 1.0 / tl.sqrt(ss / K + eps)
        logits = (acc * rstd[None, :]).to(y_ptr.dtype.element_ty)  # [BLOCK_N, BLOCK_M]
        tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], logits, mask=n_ok[:, None] & m_ok[None, :])
        # each row's maximum over the block and its first index (rows past V: -inf, so never above a real one)
        value, index = _first_max(tl.where(n_ok[:, None], logits.to(tl.float32), float("-inf")), offs_n[:, None],
                                  2147483647)
        slot = pid % SLOTS_
        tl.atomic_max(keys_ptr + slot * BLOCK_M + offs_m, _order_key(value, index), mask=m_ok, sem="relaxed")
        if tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1:  # the last program: combine
            offs_s = tl.arange(0, SLOTS_)
            at = keys_ptr + offs_s[:, None] * BLOCK_M + offs_m[None, :]
            best = tl.max(tl.load(at, cache_modifier=".cg"), axis=0)  # [BLOCK_M]
            token = (2147483647 - (best & 2147483647)).to(tl.int64)
            tl.store(out_ptr + offs_m, token, mask=m_ok)
            if NEXT:  # the next step's inputs: this token, the position one on where the row is active
                tl.store(tok_ptr + offs_m, token, mask=m_ok)
                pos = tl.load(pos_ptr + offs_m, mask=m_ok, other=0)
                tl.store(pos_ptr + offs_m, pos + tl.load(act_ptr + offs_m, mask=m_ok, other=0), mask=m_ok)
            tl.store(at, tl.zeros((SLOTS_, BLOCK_M), dtype=tl.int64))
            tl.store(cnt_ptr, 0)


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether lm_head_argmax takes these: Triton runs on their device, up to MAX_ROWS rows,
    a contiguous weight whose offsets fit in int32."""
    return (available(x.device) and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and weight.is_contiguous()
            and weight.dim() == 2 and weight.shape[1] == x.shape[1] and weight.numel() < 2**31)


def lm_head_argmax(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                   next_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, *,
                   block_n: int = 0, block_k: int = 0, num_warps: int = 0, num_stages: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(x) * norm_weight @ weight^T -> (logits [M, V] in x's dtype, their first maximal
    index a row, int64 [M]). next_inputs = (tokens, positions, active), int64 [M] each:
    tokens = the argmax and positions += active (triton_argmax.feed_next). block_n, block_k,
    num_warps, num_stages override the launch (bench/lm_head_bench.py's sweep)."""
    M, K = x.shape
    V = weight.shape[0]
    if not usable(x, weight) or x.stride(1) != 1 or norm_weight.shape != (K,) or not norm_weight.is_contiguous():
        raise ValueError(f"lm_head_argmax: x {tuple(x.shape)}, weight {tuple(weight.shape)}, norm weight "
                         f"{tuple(norm_weight.shape)} (1..{MAX_ROWS} rows, contiguous weights)")
    if next_inputs is not None and any(t.shape != (M,) or t.dtype != torch.int64 for t in next_inputs):
        raise ValueError(f"lm_head_argmax: next inputs {[(tuple(t.shape), t.dtype) for t in next_inputs]} for {M} rows")
    device = x.device
    block_m = _pow2_at_least(M, 16)
    y = torch.empty(M, V, dtype=x.dtype, device=device)
    out = torch.empty(M, dtype=torch.int64, device=device)
    keys = counter_buffer("lm_head_keys", device, SLOTS * MAX_ROWS, torch.int64)  # [SLOTS, BLOCK_M] in a launch
    block_n = block_n or BLOCK_N
    block_k = min(block_k or BLOCK_K, _pow2_at_least(K, 16))
    nxt = next_inputs or (out, out, out)
    _lm_head_argmax[(triton.cdiv(V, block_n),)](
        x, norm_weight, weight, y, out, keys, counter_buffer("lm_head", device, 1), *nxt, M, V, eps, x.stride(0),
        y.stride(0), K=K, K_PAD=triton.cdiv(K, block_k) * block_k, BLOCK_M=block_m, BLOCK_N_=block_n,
        BLOCK_K_=block_k, SLOTS_=SLOTS, NEXT=next_inputs is not None, UPCAST=device.type != "cuda",
        num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES, **pdl_launch(device))
    return y, out

