"""Greedy decoding's argmax over the vocabulary, in one Triton launch.

A greedy decode step ends in `logits.argmax(-1)` over [rows, vocab]: for Qwen2.5-0.5B at
32 rows that is 32 reductions of 151,936 values, which PyTorch's reduce kernel ran in
15.6 us on an H200 (9.7 MB of bf16 at 0.6 TB/s: too few outputs to spread the reads).
Here each (row, chunk of CHUNK values) is a program (1,216 of them) that writes its
chunk's maximum and first index; the last chunk of a row to finish (a counter per row,
left at zero) picks the row's maximum and, among equal maxima, the smallest index: the
first maximal index, as torch.argmax returns it. A NaN counts as the maximum, as in torch.

Given the decode step's input rows, the combine also feeds the next step (greedy decoding
launched ahead, cuda_graphs.DecodeStep): the row's token becomes its next input token and
its position moves on by its `active` flag, so no copy and add kernels run between steps.

Runs on the CPU under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch

from tasktune.lora.triton_ops import _pow2_at_least, available, counter_buffer, triton

__all__ = ["available", "argmax_rows"]

CHUNK = 4096  # values a program reads
MAX_ROWS = 1 << 12  # counters: one per row

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _first_max(v, idx, BIG: tl.constexpr):
        """The maximum of v (NaN if any, as torch's argmax) and the smallest idx holding it."""
        nan = v != v
        has_nan = tl.max(nan.to(tl.int32), axis=0) > 0
        m = tl.max(tl.where(nan, float("-inf"), v), axis=0)
        hit = tl.where(has_nan, nan, v == m)
        return tl.where(has_nan, float("nan"), m), tl.min(tl.where(hit, idx, BIG), axis=0)

    @triton.jit
    def _argmax_rows(x_ptr, out_ptr, pv_ptr, pi_ptr, cnt_ptr, tok_ptr, pos_ptr, act_ptr, V, stride_x,
                     CHUNK_: tl.constexpr, C: tl.constexpr, C_PAD: tl.constexpr, NEXT: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1)
        offs = c * CHUNK_ + tl.arange(0, CHUNK_)
        v = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m, i = _first_max(v, offs, 2147483647)
        tl.store(pv_ptr + row * C + c, m)
        tl.store(pi_ptr + row * C + c, i)
        if tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel") == C - 1:  # the row's last chunk: combine
            parts = tl.arange(0, C_PAD)
            ok = parts < C
            pv = tl.load(pv_ptr + row * C + parts, mask=ok, other=float("-inf"), cache_modifier=".cg")
            pi = tl.load(pi_ptr + row * C + parts, mask=ok, other=2147483647, cache_modifier=".cg")
            _, best = _first_max(pv, pi, 2147483647)  # chunks in order: the first chunk's index wins ties
            token = tl.minimum(best, V - 1).to(tl.int64)
            tl.store(out_ptr + row, token)
            if NEXT:  # the next step's inputs: this token, the position one on where the row is active
                tl.store(tok_ptr + row, token)
                tl.store(pos_ptr + row, tl.load(pos_ptr + row) + tl.load(act_ptr + row))
            tl.store(cnt_ptr + row, 0)


def argmax_rows(x: torch.Tensor, next_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
    """x: [rows, V] (unit stride along V) -> int64 [rows], each row's first maximal index,
    equal to x.argmax(-1). next_inputs = (tokens, positions, active), int64 [rows] each:
    tokens[i] = the argmax and positions[i] += active[i], as `feed_next` does."""
    rows, V = x.shape
    if x.stride(1) != 1 or not 0 < rows <= MAX_ROWS or V == 0:
        raise ValueError(f"argmax_rows: x {tuple(x.shape)} with strides {x.stride()} (unit stride, 1..{MAX_ROWS} rows)")
    if next_inputs is not None and any(t.shape != (rows,) or t.dtype != torch.int64 for t in next_inputs):
        raise ValueError(f"argmax_rows: next inputs {[(tuple(t.shape), t.dtype) for t in next_inputs]} for {rows} rows")
    C = triton.cdiv(V, CHUNK)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    pv = torch.empty(rows * C, dtype=torch.float32, device=x.device)
    pi = torch.empty(rows * C, dtype=torch.int32, device=x.device)
    nxt = next_inputs or (out, out, out)
    _argmax_rows[(rows, C)](x, out, pv, pi, counter_buffer("argmax", x.device, MAX_ROWS), *nxt, V, x.stride(0),
                            CHUNK_=CHUNK, C=C, C_PAD=_pow2_at_least(C, 2), NEXT=next_inputs is not None)
    return out


def feed_next(tokens: torch.Tensor, next_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """What argmax_rows(..., next_inputs) writes besides its result, in torch."""
    tok, pos, active = next_inputs
    tok.copy_(tokens)
    pos.add_(active)
