"""Sampled decoding's draw (temperature, top-p, min-p) on the device, one Triton launch.

The logits path (`sampling.draw`) copies the step's logits out, filters them with ~20
eager launches and sorts 4.9 M floats for top-p (32 rows of Qwen's 151,936), and the step
after it waits for the host: a sampled step cost ~2.5x a greedy one on an H200. Here one
program draws one row's token in a few passes over its logits, with no sort:

- the row's maximum, then the total weight w_i = exp((x_i - max) / T) of the tokens min-p
  keeps (w_i >= min_p, the top token's weight being 1);
- inverse-CDF sampling over the candidates in vocabulary order: a uniform u, the first
  token whose running weight exceeds u times the candidates' total;
- top-p by rejection (as FlashInfer samples): the token is in the nucleus when the tokens
  strictly heavier than it weigh less than top_p of the total; else the candidates become
  those heavier tokens (their total is that weight) and it draws again. Every round's set
  holds the nucleus, so an accepted token is distributed as the nucleus's renormalised
  weights, the distribution `sampling_probs` gives (up to ties at the nucleus's edge).

The uniform of (row, round) is Philox keyed by the request's seed at counter position *
ROUNDS + round, where position is where the drawn token goes: a seeded request's tokens
depend on its seed and its logits only, not on its batch or on steps launched and
discarded. Rows read their temperature, top-p, min-p and seed from a table by KV slot
(`SamplingTable`, written when a sequence takes the slot), so a step needs no host input.
The token goes to the row's output and, for a decode step, to the next step's input token
(positions were moved on by the step's tail), so the step after it can be launched before
the host reads it. Runs on the CPU under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import random

import torch

from tasktune.lora.triton_ops import _pow2_at_least, available, triton

__all__ = ["available", "SamplingTable", "sample_rows"]

BLOCK = 8192  # logits a loop iteration reads (8 warps: enough bytes in flight for one program a row)
ROUNDS = 32  # top-p draws at most (then the argmax, always in the nucleus): each round keeps
#              the nucleus and drops at least the drawn token

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _sample_rows(x_ptr, stride_x, row_ptr, slot_ptr, key_ptr, par_ptr, seed_ptr, out_ptr, tok_ptr, V,
                     KEY_BY_SLOT: tl.constexpr, NEXT: tl.constexpr, BLOCK_: tl.constexpr, ROUNDS_: tl.constexpr):
        i = tl.program_id(0)
        row = tl.load(row_ptr + i)
        slot = tl.load(slot_ptr + i)
        key = tl.load(key_ptr + slot) if KEY_BY_SLOT else tl.load(key_ptr + i)
        inv_t = 1.0 / tl.load(par_ptr + slot * 3)
        top_p = tl.load(par_ptr + slot * 3 + 1)
        floor = tl.log(tl.load(par_ptr + slot * 3 + 2))  # log min_p: -inf without min-p
        seed = tl.load(seed_ptr + slot)
        x = x_ptr + row.to(tl.int64) * stride_x
        offs = tl.arange(0, BLOCK_)
        m = float("-inf")
        best = 0
        for b in range(0, V, BLOCK_):  # the maximum and its first index (NaNs never count)
            v = tl.load(x + b + offs, mask=b + offs < V, other=float("-inf")).to(tl.float32)
            v = tl.where(v != v, float("-inf"), v)
            bm = tl.max(v, axis=0)
            bi = tl.min(tl.where(v == bm, b + offs, 2147483647), axis=0)
            best = tl.where(bm > m, bi, best)
            m = tl.maximum(m, bm)
        total = 0.0
        for b in range(0, V, BLOCK_):
            s = (tl.load(x + b + offs, mask=b + offs < V, other=float("-inf")).to(tl.float32) - m) * inv_t
            total += tl.sum(tl.where(s >= floor, tl.exp(s), 0.0), axis=0)
        token = best
        done = ((total != total) | (total <= 0.0) | (total == float("inf"))).to(tl.int32)  # degenerate: the argmax
        low = 0.0  # candidates weigh more than this
        mass = total  # ... and this much together
        r = 0
        while (done == 0) & (r < ROUNDS_):
            u = tl.sum(tl.rand(seed, tl.full((1,), 0, tl.int32) + (key * ROUNDS_ + r).to(tl.int32)), axis=0)
            target = u * mass
            acc = 0.0
            hit = 2147483647
            last = 0
            b = 0
            while (b < V) & (hit == 2147483647):  # inverse CDF over the candidates, in vocabulary order
                s = (tl.load(x + b + offs, mask=b + offs < V, other=float("-inf")).to(tl.float32) - m) * inv_t
                w = tl.exp(s)
                ok = (s >= floor) & (w > low)
                w = tl.where(ok, w, 0.0)
                hit = tl.min(tl.where(ok & (acc + tl.cumsum(w, axis=0) > target), b + offs, 2147483647), axis=0)
                last = tl.maximum(last, tl.max(tl.where(ok, b + offs, 0), axis=0))
                acc += tl.sum(w, axis=0)
                b += BLOCK_
            token = tl.where(hit < 2147483647, hit, last)  # (u * mass past the rounded sum: the last one)
            wt = tl.exp((tl.load(x + token).to(tl.float32) - m) * inv_t)
            heavier = 0.0
            if top_p < 1.0:
                for b in range(0, V, BLOCK_):
                    s = (tl.load(x + b + offs, mask=b + offs < V, other=float("-inf")).to(tl.float32) - m) * inv_t
                    w = tl.exp(s)
                    heavier += tl.sum(tl.where((s >= floor) & (w > wt), w, 0.0), axis=0)
            done = (heavier < top_p * total).to(tl.int32)
            low = wt
            mass = heavier
            r += 1
        token = tl.where(done != 0, token, best).to(tl.int64)
        tl.store(out_ptr + row, token)
        if NEXT:
            tl.store(tok_ptr + slot, token)


class SamplingTable:
    """Each KV slot's temperature, top-p, min-p and seed, on the device, for `sample_rows`."""

    def __init__(self, slots: int, device: torch.device):
        self.params = torch.zeros(slots, 3, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(slots, dtype=torch.int64, device=device)

    def set(self, slot: int, temperature: float, top_p: float, min_p: float, seed: int | None) -> None:
        """The slot's new sequence draws with these (seed None: a random one). A write the
        device makes after the work already launched: a step launched ahead keeps the old row."""
        seed = random.getrandbits(62) if seed is None else _mix(seed)
        # (a temperature below float32's range would divide by 0: the smallest one it holds acts the same)
        # (fills, not a copy from host memory: that can wait for the step running ahead)
        for j, value in enumerate((max(temperature, 1e-30), top_p, min_p)):
            self.params[slot, j].fill_(value)
        self.seeds[slot].fill_(seed)


def _mix(seed: int) -> int:
    """A user's seed (often 0, 1, 2, ...: `n` choices take seed + j) spread over 62 bits
    (splitmix64), so related seeds key unrelated Philox streams."""
    x = (seed + 0x9E3779B97F4A7C15) & (1 << 64) - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (1 << 64) - 1
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (1 << 64) - 1
    return (x ^ (x >> 31)) >> 2


def sample_rows(logits: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor,
                table: SamplingTable, out: torch.Tensor, next_tokens: torch.Tensor | None = None,
                keys_by_slot: bool | None = None) -> None:
    """Draw a token for each of `rows` of logits [R, V] (unit stride along V) into out[row]
    (int64, by logits row): row rows[i] of KV slot slots[i] draws with that slot's entry of
    `table`, keyed by keys[i] (the position the token goes to). next_tokens: a decode step's
    input tokens by slot (also written); then keys is indexed by slot (its positions), as
    with keys_by_slot."""
    if logits.stride(1) != 1 or rows.shape != slots.shape:
        raise ValueError(f"sample_rows: logits {tuple(logits.shape)} strides {logits.stride()}, rows {tuple(rows.shape)}, "
                         f"slots {tuple(slots.shape)}")
    if rows.numel() == 0:
        return
    _sample_rows[(rows.numel(),)](logits, logits.stride(0), rows, slots, keys, table.params, table.seeds, out,
                                  next_tokens if next_tokens is not None else out, logits.shape[1],
                                  KEY_BY_SLOT=next_tokens is not None if keys_by_slot is None else keys_by_slot,
                                  NEXT=next_tokens is not None,
                                  BLOCK_=min(BLOCK, _pow2_at_least(logits.shape[1], 16)),
                                  ROUNDS_=ROUNDS, num_warps=8)
