"""Sampled decoding's draw (temperature, top-p or top-k, min-p) on the device, a few Triton launches.

The logits path (`sampling.draw`) copies the step's logits out, filters them with ~20
eager launches and sorts 4.9 M floats for top-p (32 rows of Qwen's 151,936), and the step
after it waits for the host: a sampled step cost ~2.5x a greedy one on an H200. Here the
draw reads each row's logits a few times, with no sort:

- the row's maximum, then the total weight w_i = exp((x_i - max) / T) of the tokens min-p
  keeps (w_i >= min_p, the top token's weight being 1);
- inverse-CDF sampling over the candidates in vocabulary order: a uniform u, the first
  token whose running weight exceeds u times the candidates' total;
- top-p by rejection (as FlashInfer samples): the token is in the nucleus when the tokens
  strictly heavier than it weigh less than top_p of the total; else the candidates become
  those heavier tokens (their total is that weight) and it draws again. Every round's set
  holds the nucleus, so an accepted token is distributed as the nucleus's renormalised
  weights, the distribution `sampling_probs` gives (up to ties at the nucleus's edge);
- top-k up to triton_top_k.TOP_K (64) from each chunk's k largest logits (triton_top_k.py:
  the row's k-th largest T among them, a draw among the tokens >= T, top-p of what top-k
  kept by rejection there, as vLLM orders them). A larger k is checked the way top-p is:
  the token stands when fewer than k tokens are heavier (with top-p too, such rows keep
  the logits path: the test would take top-p of the whole).

Each pass is split over (row, chunk of CHUNK logits) programs, as triton_argmax is: one
program a row used 32 of an H200's 132 SMs and took 136 us a step. A pass's programs write
their chunk's sums and the row's last one to finish (a counter per row) combines them: the
first pass gives the maximum and, without min-p, the total and round 0's token (the chunk
its target falls in, then the token inside that chunk); each next pass weighs the tokens
heavier than the drawn one, which both checks it and gives the next round's candidates by
chunk. After SPLIT_ROUNDS checks, the rows still drawing (top-p rejects a token less than
1 - top_p of the time) go on in one program a row.

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

from tasktune.lora.triton_ops import _pow2_at_least, available, counter_buffer, triton
from tasktune.serve import triton_top_k

__all__ = ["available", "SamplingTable", "sample_rows"]

CHUNK = 4096  # logits a program of the split passes reads (37 programs a row of Qwen's vocabulary)
SPLIT_ROUNDS = 2  # top-p checks made by split passes; the per-row loop takes the rare rows left
BLOCK = 8192  # logits a loop iteration of the per-row loop reads
ROUNDS = 32  # top-p draws at most (then the argmax, always in the nucleus): each round keeps
#              the nucleus and drops at least the drawn token
MAX_ROWS = 1 << 16  # "last chunk" counters: one per row
# a row's state between passes: float32 (max, total), int32 (argmax, token, done, round, has_token)

if triton is not None:
    import triton.language as tl

    from tasktune.serve.triton_draw_parts import BIG, chunk_logits, degenerate, slot_params, uniform

    @triton.jit
    def _draw_from_chunks(x, w, u, m, inv_t, floor, low, V, CHUNK_: tl.constexpr, C_PAD: tl.constexpr):
        """Inverse CDF over the candidates (s >= floor, weight > low) in vocabulary order,
        given each chunk's candidate weight w [C_PAD]: the chunk the target falls in, then
        the token inside it (past the rounded sums: the chunk's last candidate)."""
        parts = tl.arange(0, C_PAD)
        target = u * tl.sum(w, axis=0)
        c = tl.min(tl.where((tl.cumsum(w, axis=0) > target) & (w > 0.0), parts, C_PAD), axis=0)
        c = tl.where(c < C_PAD, c, tl.maximum(tl.max(tl.where(w > 0.0, parts, 0), axis=0), 0))
        before = tl.sum(tl.where(parts < c, w, 0.0), axis=0)
        offs = c * CHUNK_ + tl.arange(0, CHUNK_)
        s = (tl.load(x + offs, mask=offs < V, other=float("-inf")).to(tl.float32) - m) * inv_t
        wv = tl.exp(s)
        ok = (s >= floor) & (wv > low)
        wv = tl.where(ok, wv, 0.0)
        hit = tl.min(tl.where(ok & (before + tl.cumsum(wv, axis=0) > target), offs, BIG), axis=0)
        return tl.where(hit < BIG, hit, tl.maximum(tl.max(tl.where(ok, offs, 0), axis=0), 0))

    @triton.jit
    def _sample_first(x_ptr, stride_x, row_ptr, slot_ptr, key_ptr, par_ptr, seed_ptr, pm_ptr, pi_ptr, pw_ptr,
                      cnt_ptr, sf_ptr, si_ptr, V, KEY_BY_SLOT: tl.constexpr, CHUNK_: tl.constexpr,
                      C: tl.constexpr, C_PAD: tl.constexpr, ROUNDS_: tl.constexpr, KP: tl.constexpr):
        """(row, chunk): the chunk's maximum, its first index and its weight relative to
        it; the row's last chunk to finish takes the row's maximum and argmax and, without
        min-p, its total and round 0's token (a top-k row with k <= KP: done, its token comes
        from triton_top_k's draw; KP 0 when that is not launched)."""
        i = tl.program_id(0)
        c = tl.program_id(1)
        row = tl.load(row_ptr + i)
        slot = tl.load(slot_ptr + i)
        inv_t, top_p, floor, top_k = slot_params(par_ptr, slot)
        x = x_ptr + row.to(tl.int64) * stride_x
        offs, v = chunk_logits(x, c, V, CHUNK_)
        mc = tl.max(v, axis=0)
        tl.store(pm_ptr + i * C + c, mc)
        tl.store(pi_ptr + i * C + c, tl.min(tl.where(v == mc, offs, BIG), axis=0))
        tl.store(pw_ptr + i * C + c, tl.sum(tl.where(v > float("-inf"), tl.exp((v - mc) * inv_t), 0.0), axis=0))
        if tl.atomic_add(cnt_ptr + i, 1, sem="acq_rel") == C - 1:
            parts = tl.arange(0, C_PAD)
            pm = tl.load(pm_ptr + i * C + parts, mask=parts < C, other=float("-inf"), cache_modifier=".cg")
            pi = tl.load(pi_ptr + i * C + parts, mask=parts < C, other=BIG, cache_modifier=".cg")
            pw = tl.load(pw_ptr + i * C + parts, mask=parts < C, other=0.0, cache_modifier=".cg")
            m = tl.max(pm, axis=0)
            best = tl.min(tl.where(pm == m, pi, BIG), axis=0)
            w = tl.where(pm > float("-inf"), pw * tl.exp((pm - m) * inv_t), 0.0)
            total = tl.sum(w, axis=0)
            token = best
            done = 0
            has = 0
            if (top_k > 0.0) & (top_k <= KP):  # drawn from its candidates next
                done = 1
                has = 1
            elif floor == float("-inf"):  # no min-p: the weights are the candidates', draw now
                has = 1
                if degenerate(total):
                    done = 1
                else:
                    key = tl.load(key_ptr + slot) if KEY_BY_SLOT else tl.load(key_ptr + i)
                    u = uniform(tl.load(seed_ptr + slot), key, 0, ROUNDS_)
                    token = _draw_from_chunks(x, w, u, m, inv_t, floor, 0.0, V, CHUNK_, C_PAD)
                    done = ((top_p >= 1.0) & (top_k <= 0.0)).to(tl.int32)
            tl.store(sf_ptr + i * 2, m)
            tl.store(sf_ptr + i * 2 + 1, total)
            tl.store(si_ptr + i * 5, best)
            tl.store(si_ptr + i * 5 + 1, token)
            tl.store(si_ptr + i * 5 + 2, done)
            tl.store(si_ptr + i * 5 + 3, 0)
            tl.store(si_ptr + i * 5 + 4, has)
            tl.store(cnt_ptr + i, 0)

    @triton.jit
    def _sample_round(x_ptr, stride_x, row_ptr, slot_ptr, key_ptr, par_ptr, seed_ptr, pw_ptr, pn_ptr, cnt_ptr,
                      sf_ptr, si_ptr, V, KEY_BY_SLOT: tl.constexpr, CHUNK_: tl.constexpr, C: tl.constexpr,
                      C_PAD: tl.constexpr, ROUNDS_: tl.constexpr):
        """(row, chunk) of a row not done: the weight and number of its candidates heavier
        than the drawn token (or, min-p rows without one yet, of all its candidates). The
        last chunk to finish accepts the token (top-p: heavier ones weigh < top_p of the
        total; top-k: fewer than k are heavier) or draws the next round's from the heavier
        ones, whose chunk weights it has."""
        i = tl.program_id(0)
        c = tl.program_id(1)
        if tl.load(si_ptr + i * 5 + 2) == 0:
            row = tl.load(row_ptr + i)
            slot = tl.load(slot_ptr + i)
            inv_t, top_p, floor, top_k = slot_params(par_ptr, slot)
            x = x_ptr + row.to(tl.int64) * stride_x
            m = tl.load(sf_ptr + i * 2)
            token = tl.load(si_ptr + i * 5 + 1)
            has = tl.load(si_ptr + i * 5 + 4)
            wt = tl.exp((tl.load(x + token).to(tl.float32) - m) * inv_t)
            thr = tl.where(has != 0, wt, 0.0)
            offs = c * CHUNK_ + tl.arange(0, CHUNK_)
            s = (tl.load(x + offs, mask=offs < V, other=float("-inf")).to(tl.float32) - m) * inv_t
            w = tl.exp(s)
            over = (s >= floor) & (w > thr)
            tl.store(pw_ptr + i * C + c, tl.sum(tl.where(over, w, 0.0), axis=0))
            tl.store(pn_ptr + i * C + c, tl.sum(over.to(tl.int32), axis=0))
            if tl.atomic_add(cnt_ptr + i, 1, sem="acq_rel") == C - 1:
                parts = tl.arange(0, C_PAD)
                pw = tl.load(pw_ptr + i * C + parts, mask=parts < C, other=0.0, cache_modifier=".cg")
                heavier = tl.sum(pw, axis=0)
                rank = tl.sum(tl.load(pn_ptr + i * C + parts, mask=parts < C, other=0, cache_modifier=".cg"), axis=0)
                total = tl.load(sf_ptr + i * 2 + 1)
                r = tl.load(si_ptr + i * 5 + 3)
                done = 0
                draw = 1
                if has != 0:  # check the token, else draw again from the heavier ones
                    if (heavier < top_p * total) & ((top_k <= 0.0) | (rank < top_k)):
                        done = 1
                        draw = 0
                    else:
                        r += 1
                        if r >= ROUNDS_:
                            done = 1
                            draw = 0
                            token = tl.load(si_ptr + i * 5)
                else:  # min-p: the candidates' total, then round 0's draw
                    total = heavier
                    tl.store(sf_ptr + i * 2 + 1, total)
                    if degenerate(total):
                        done = 1
                        draw = 0
                        token = tl.load(si_ptr + i * 5)
                if draw != 0:
                    key = tl.load(key_ptr + slot) if KEY_BY_SLOT else tl.load(key_ptr + i)
                    u = uniform(tl.load(seed_ptr + slot), key, r, ROUNDS_)
                    token = _draw_from_chunks(x, pw, u, m, inv_t, floor, thr, V, CHUNK_, C_PAD)
                    done = ((top_p >= 1.0) & (top_k <= 0.0)).to(tl.int32)
                tl.store(si_ptr + i * 5 + 1, token)
                tl.store(si_ptr + i * 5 + 2, done)
                tl.store(si_ptr + i * 5 + 3, r)
                tl.store(si_ptr + i * 5 + 4, 1)
                tl.store(cnt_ptr + i, 0)

    @triton.jit
    def _sample_rest(x_ptr, stride_x, row_ptr, slot_ptr, key_ptr, par_ptr, seed_ptr, sf_ptr, si_ptr, out_ptr,
                     tok_ptr, V, KEY_BY_SLOT: tl.constexpr, NEXT: tl.constexpr, BLOCK_: tl.constexpr,
                     ROUNDS_: tl.constexpr):
        """One program a row: rows the split passes left undone go on checking and drawing
        (each pass over the whole row); every row writes its token."""
        i = tl.program_id(0)
        row = tl.load(row_ptr + i)
        slot = tl.load(slot_ptr + i)
        token = tl.load(si_ptr + i * 5 + 1)
        done = tl.load(si_ptr + i * 5 + 2)
        if done == 0:
            inv_t, top_p, floor, top_k = slot_params(par_ptr, slot)
            x = x_ptr + row.to(tl.int64) * stride_x
            m = tl.load(sf_ptr + i * 2)
            total = tl.load(sf_ptr + i * 2 + 1)
            r = tl.load(si_ptr + i * 5 + 3)
            key = tl.load(key_ptr + slot) if KEY_BY_SLOT else tl.load(key_ptr + i)
            seed = tl.load(seed_ptr + slot)
            offs = tl.arange(0, BLOCK_)
            while (done == 0) & (r < ROUNDS_):
                wt = tl.exp((tl.load(x + token).to(tl.float32) - m) * inv_t)
                heavier = 0.0
                rank = 0
                for b in range(0, V, BLOCK_):
                    s = (tl.load(x + b + offs, mask=b + offs < V, other=float("-inf")).to(tl.float32) - m) * inv_t
                    w = tl.exp(s)
                    over = (s >= floor) & (w > wt)
                    heavier += tl.sum(tl.where(over, w, 0.0), axis=0)
                    rank += tl.sum(over.to(tl.int32), axis=0)
                if (heavier < top_p * total) & ((top_k <= 0.0) | (rank < top_k)):
                    done = 1
                else:
                    r += 1
                    if r < ROUNDS_:  # inverse CDF over the heavier ones, in vocabulary order
                        target = uniform(seed, key, r, ROUNDS_) * heavier
                        acc = 0.0
                        hit = BIG
                        last = 0
                        b = 0
                        while (b < V) & (hit == BIG):
                            s = (tl.load(x + b + offs, mask=b + offs < V, other=float("-inf")).to(tl.float32) - m) * inv_t
                            w = tl.exp(s)
                            ok = (s >= floor) & (w > wt)
                            w = tl.where(ok, w, 0.0)
                            hit = tl.min(tl.where(ok & (acc + tl.cumsum(w, axis=0) > target), b + offs, BIG), axis=0)
                            last = tl.maximum(last, tl.max(tl.where(ok, b + offs, 0), axis=0))
                            acc += tl.sum(w, axis=0)
                            b += BLOCK_
                        token = tl.where(hit < BIG, hit, last)
            token = tl.where(done != 0, token, tl.load(si_ptr + i * 5))
        token = token.to(tl.int64)
        tl.store(out_ptr + row, token)
        if NEXT:
            tl.store(tok_ptr + slot, token)


class SamplingTable:
    """Each KV slot's temperature, top-p, min-p, top-k and seed, on the device, for `sample_rows`."""

    def __init__(self, slots: int, device: torch.device):
        self.params = torch.zeros(slots, 4, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(slots, dtype=torch.int64, device=device)
        self.top_k_slots: set[int] = set()  # slots whose top-k the candidates' kernels take (sample_rows)

    def set(self, slot: int, temperature: float, top_p: float, min_p: float, seed: int | None, top_k: int = 0) -> None:
        """The slot's new sequence draws with these (seed None: a random one). A write the
        device makes after the work already launched: a step launched ahead keeps the old row."""
        seed = random.getrandbits(62) if seed is None else _mix(seed)
        # (a temperature below float32's range would divide by 0: the smallest one it holds acts the same)
        # (fills, not a copy from host memory: that can wait for the step running ahead)
        for j, value in enumerate((max(temperature, 1e-30), top_p, min_p, max(top_k, 0))):
            self.params[slot, j].fill_(value)
        self.seeds[slot].fill_(seed)
        if 0 < top_k <= triton_top_k.TOP_K:
            self.top_k_slots.add(slot)
        else:
            self.top_k_slots.discard(slot)


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
    n, V = rows.numel(), logits.shape[1]
    if n == 0:
        return
    if n > MAX_ROWS or SPLIT_ROUNDS < 1:
        raise ValueError(f"sample_rows: {n} rows (at most {MAX_ROWS}), {SPLIT_ROUNDS} split rounds (at least 1)")
    chunk = min(CHUNK, _pow2_at_least(V, 16))
    C = triton.cdiv(V, chunk)
    f32 = torch.empty(n * (2 * C + 2), dtype=torch.float32, device=logits.device)
    i32 = torch.empty(n * (C + 5), dtype=torch.int32, device=logits.device)
    pm, pw, sf = f32[:n * C], f32[n * C:2 * n * C], f32[2 * n * C:]
    pi, si = i32[:n * C], i32[n * C:]
    counters = counter_buffer("sample", logits.device, MAX_ROWS)
    c_pad = _pow2_at_least(C, 2)
    by_slot = next_tokens is not None if keys_by_slot is None else keys_by_slot
    common = (logits, logits.stride(0), rows, slots, keys, table.params, table.seeds)
    split = dict(KEY_BY_SLOT=by_slot, CHUNK_=chunk, C=C, C_PAD=c_pad, ROUNDS_=ROUNDS, num_warps=4)
    top_k = bool(table.top_k_slots)  # some slot asks for top-k <= TOP_K: its rows' candidates, then their draw
    if top_k:
        candidates = triton_top_k.candidates(logits, common, n, C, c_pad, chunk)
    _sample_first[(n, C)](*common, pm, pi, pw, counters, sf, si, V, KP=triton_top_k.TOP_K if top_k else 0, **split)
    if top_k:
        triton_top_k.draw(common, sf, si, candidates, V, split)
    for _ in range(SPLIT_ROUNDS):
        _sample_round[(n, C)](*common, pw, pi, counters, sf, si, V, **split)  # (pi: now the chunks' counts)
    _sample_rest[(n,)](*common, sf, si, out, next_tokens if next_tokens is not None else out, V,
                       KEY_BY_SLOT=by_slot, NEXT=next_tokens is not None,
                       BLOCK_=min(BLOCK, _pow2_at_least(V, 16)), ROUNDS_=ROUNDS, num_warps=8)
