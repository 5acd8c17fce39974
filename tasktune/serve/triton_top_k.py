"""Top-k (k <= TOP_K) for the device-side draw (triton_sample.py), from candidates.

Rejection alone (the token stands when fewer than k tokens are heavier) rejected 66% of
first draws at top-k 50 on the serve bench's logits and left rows to the per-row loop
(118 us a draw of 32 rows on an H200), and could not take top-p of what top-k kept
(vLLM's order), so top-k with top-p went through the logits. Here each (row, chunk)
program keeps its chunk's k largest logits: those above its k-th, found a bit at a time
(16 steps for bf16), then its ties at the k-th while its TOP_K places last, with the count
of all of them. One program a row then finds the row's k-th largest T among the
candidates (every chunk's share of the row's top k is there) and draws over the tokens >=
T that min-p keeps, top-p by rejection among them. Ties at T a chunk had no room for are
counted at T's weight; a draw that lands on one finds it in its chunk. Two launches, made
only while some slot of the SamplingTable asks for such a top-k.
"""
from __future__ import annotations

import torch

from tasktune.lora.triton_ops import triton

TOP_K = 64  # candidates a chunk keeps at most; rows with a larger k draw by rejection

if triton is not None:
    import triton.language as tl

    from tasktune.serve.triton_draw_parts import BIG, chunk_logits, degenerate, slot_params, uniform

    NO_KEY = tl.constexpr(2147483647)  # above every _sort_key (NaN's bits, never a key: NaNs are -inf here)

    @triton.jit
    def _sort_key(v):
        """An int32 key in v's float32 order (-0 below +0)."""
        bits = v.to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    @triton.jit
    def _kth_key(key, ok, k, LOW: tl.constexpr):
        """The k-th largest of the keys where ok (all of them, fewer there; NO_KEY, none),
        searched a bit at a time from the top: the largest t on a grid of 2^LOW with k keys
        >= t, then the smallest key above it (bf16 logits: LOW 16, 16 steps)."""
        t = tl.full((), -2147483648, tl.int64)  # (t + 2^b stays below 2^31 - 2^LOW: int32 compares)
        for b in tl.static_range(31, LOW - 1, -1):
            if tl.sum((ok & (key >= (t + (1 << b)).to(tl.int32))).to(tl.int32), axis=0) >= k:
                t = t + (1 << b)
        t = t.to(tl.int32)
        return tl.min(tl.where(ok & (key >= t), key, NO_KEY), axis=0)

    @triton.jit
    def _tie(x, c, key_t, nth, V, CHUNK_: tl.constexpr):
        """The index of chunk c's nth logit (from 0, vocabulary order) whose key is key_t."""
        offs, v = chunk_logits(x, c, V, CHUNK_)
        eq = (_sort_key(v) == key_t) & (offs < V)
        return tl.min(tl.where(eq & (tl.cumsum(eq.to(tl.int32), axis=0) - 1 == nth), offs, BIG), axis=0)

    @triton.jit
    def _sample_top_k(x, cv_ptr, ci_ptr, cn_ptr, m, inv_t, top_p, floor, top_k, seed, key, best, C, V,
                      CHUNK_: tl.constexpr, ROUNDS_: tl.constexpr, C_PAD: tl.constexpr, KP: tl.constexpr,
                      LOW: tl.constexpr):
        """A top-k row's whole draw from its chunks' candidates (_sample_candidates): the row's k-th
        largest logit T, then inverse-CDF draws over the tokens >= T that min-p keeps, top-p
        by rejection among them (the tokens strictly heavier than the drawn one weigh less
        than top_p of the top-k total: vLLM's top-p of what top-k kept). A chunk with more
        ties at its k-th logit than its room holds (KP) counts the rest at weight w(T) when
        its k-th logit is T, and a draw that lands on them finds its tie in the chunk."""
        N_CAND: tl.constexpr = C_PAD * KP
        j = tl.arange(0, N_CAND)
        parts = tl.arange(0, C_PAD)
        kept = tl.load(cn_ptr + parts, mask=parts < C, other=0, cache_modifier=".cg")  # [C_PAD], ties all counted
        live = (j % KP) < tl.load(cn_ptr + j // KP, mask=j // KP < C, other=0, cache_modifier=".cg")
        cv = tl.load(cv_ptr + j, mask=live, other=float("-inf"), cache_modifier=".cg")
        ci = tl.load(ci_ptr + j, mask=live, other=0, cache_modifier=".cg")
        ck = _sort_key(cv)
        kt = _kth_key(ck, live, top_k, LOW)
        above = tl.reshape((live & (ck > kt)).to(tl.int32), (C_PAD, KP))
        at_t = tl.min(tl.reshape(tl.where(live, ck, NO_KEY), (C_PAD, KP)), axis=1) == kt  # chunk's k-th is T
        missing = tl.where((kept > KP) & at_t, kept - KP, 0)  # [C_PAD] ties at T a chunk had no room for
        s = (cv - m) * inv_t
        ok = live & (ck >= kt) & (s >= floor)
        w = tl.where(ok, tl.exp(s), 0.0)
        s_t = (tl.max(tl.where(live & (ck == kt), cv, float("-inf")), axis=0) - m) * inv_t
        w_t = tl.where(s_t >= floor, tl.exp(s_t), 0.0)
        n_virtual = tl.sum(missing, axis=0)
        total = tl.sum(w, axis=0) + n_virtual.to(tl.float32) * w_t
        token = best
        if not degenerate(total):
            thr = -1.0
            r = 0
            while r < ROUNDS_:
                cand = ok & (w > thr)
                wc = tl.where(cand, w, 0.0)
                listed = tl.sum(wc, axis=0)
                virtual = tl.where(w_t > thr, n_virtual.to(tl.float32) * w_t, 0.0)
                target = uniform(seed, key, r, ROUNDS_) * (listed + virtual)
                if (target < listed) | (virtual <= 0.0):
                    pos = tl.min(tl.where(cand & (tl.cumsum(wc, axis=0) > target), j, N_CAND), axis=0)
                    pos = tl.where(pos < N_CAND, pos, tl.max(tl.where(cand, j, 0), axis=0))
                    wt = tl.sum(tl.where(j == pos, w, 0.0), axis=0)
                    token = tl.sum(tl.where(j == pos, ci, 0), axis=0)
                else:  # one of the ties at T past a chunk's room: which chunk, then which tie in it
                    nth = tl.minimum(((target - listed) / w_t).to(tl.int32), n_virtual - 1)
                    upto = tl.cumsum(missing, axis=0)
                    c = tl.min(tl.where(upto > nth, parts, C_PAD), axis=0)
                    stored_ties = KP - tl.sum(tl.sum(tl.where(parts[:, None] == c, above, 0), axis=1), axis=0)
                    before = tl.sum(tl.where(parts < c, missing, 0), axis=0)
                    token = _tie(x, c, kt, stored_ties + nth - before, V, CHUNK_)
                    wt = w_t
                if tl.sum(tl.where(ok & (w > wt), w, 0.0), axis=0) < top_p * total:
                    r = ROUNDS_ + 1  # accepted
                else:
                    thr = wt
                    r += 1
            if r == ROUNDS_:  # never accepted: the argmax, always in the nucleus
                token = best
        return token

    @triton.jit
    def _sample_candidates(x_ptr, stride_x, row_ptr, slot_ptr, par_ptr, cv_ptr, ci_ptr, cn_ptr, V,
                           CHUNK_: tl.constexpr, C_PAD: tl.constexpr, KP: tl.constexpr, LOW: tl.constexpr):
        """(row, chunk) of a top-k row (k <= KP): the chunk's k largest logits (those above its
        k-th, then its ties at the k-th while the KP places last: cv, ci) and how many it has
        (cn: ties all counted)."""
        i = tl.program_id(0)
        c = tl.program_id(1)
        slot = tl.load(slot_ptr + i)
        top_k = tl.load(par_ptr + slot * 4 + 3)
        if (top_k > 0.0) & (top_k <= KP):
            x = x_ptr + tl.load(row_ptr + i).to(tl.int64) * stride_x
            offs, v = chunk_logits(x, c, V, CHUNK_)
            live = v > float("-inf")
            key = _sort_key(v)
            kt = _kth_key(key, live, top_k.to(tl.int32), LOW)
            gt = live & (key > kt)
            eq = live & (key == kt)
            n_gt = tl.sum(gt.to(tl.int32), axis=0)
            at = tl.where(gt, tl.cumsum(gt.to(tl.int32), axis=0), n_gt + tl.cumsum(eq.to(tl.int32), axis=0)) - 1
            base = (i * C_PAD + c) * KP
            tl.store(cv_ptr + base + at, v, mask=(gt | eq) & (at < KP))
            tl.store(ci_ptr + base + at, offs, mask=(gt | eq) & (at < KP))
            tl.store(cn_ptr + i * C_PAD + c, n_gt + tl.sum(eq.to(tl.int32), axis=0))

    @triton.jit
    def _sample_top_k_rows(x_ptr, stride_x, row_ptr, slot_ptr, key_ptr, par_ptr, seed_ptr, sf_ptr, si_ptr, cv_ptr,
                           ci_ptr, cn_ptr, V, KEY_BY_SLOT: tl.constexpr, CHUNK_: tl.constexpr, C: tl.constexpr,
                           C_PAD: tl.constexpr, ROUNDS_: tl.constexpr, KP: tl.constexpr, LOW: tl.constexpr):
        """One program a row: a top-k row's (k <= KP) token, drawn from its chunks' candidates
        after the first pass (which gave its maximum and argmax and marked it done)."""
        i = tl.program_id(0)
        slot = tl.load(slot_ptr + i)
        inv_t, top_p, floor, top_k = slot_params(par_ptr, slot)
        if (top_k > 0.0) & (top_k <= KP):
            x = x_ptr + tl.load(row_ptr + i).to(tl.int64) * stride_x
            key = tl.load(key_ptr + slot) if KEY_BY_SLOT else tl.load(key_ptr + i)
            token = _sample_top_k(x, cv_ptr + i * C_PAD * KP, ci_ptr + i * C_PAD * KP, cn_ptr + i * C_PAD,
                                  tl.load(sf_ptr + i * 2), inv_t, top_p, floor, top_k.to(tl.int32),
                                  tl.load(seed_ptr + slot), key, tl.load(si_ptr + i * 5), C, V, CHUNK_, ROUNDS_,
                                  C_PAD, KP, LOW)
            tl.store(si_ptr + i * 5 + 1, token)


def candidates(logits: torch.Tensor, common: tuple, n: int, C: int, c_pad: int, chunk: int) -> tuple:
    """Launch the candidates' pass over n rows of C chunks (common: triton_sample's leading
    kernel arguments) -> the buffers `draw` reads, and the low bits the logits' floats lack."""
    cand_v = torch.empty(n * c_pad * TOP_K, dtype=torch.float32, device=logits.device)
    cand_i = torch.empty(n * c_pad * (TOP_K + 1), dtype=torch.int32, device=logits.device)
    low = {torch.bfloat16: 16, torch.float16: 13}.get(logits.dtype, 0)
    buffers = (cand_v, cand_i, cand_i[n * c_pad * TOP_K:])
    x, stride, rows, slots, _, params, _ = common
    _sample_candidates[(n, C)](x, stride, rows, slots, params, *buffers, logits.shape[1], CHUNK_=chunk, C_PAD=c_pad,
                               KP=TOP_K, LOW=low, num_warps=8)  # (4 warps: 254 registers)
    return buffers, low


def draw(common: tuple, sf: torch.Tensor, si: torch.Tensor, cand: tuple, V: int, split: dict) -> None:
    """After triton_sample's first pass (row maxima and argmax in sf / si, top-k rows marked
    done): each top-k row's token into si."""
    buffers, low = cand
    _sample_top_k_rows[(len(common[2]),)](*common, sf, si, *buffers, V, KP=TOP_K, LOW=low,
                                          **{**split, "num_warps": 16})
