"""Device functions both sampled draws use (triton_sample.py, triton_top_k.py): a slot's
parameters from the SamplingTable, a chunk of a row's logits, the Philox uniform of a
(seed, key, round), and the test for a row whose weights cannot be drawn from."""
from __future__ import annotations

from tasktune.lora.triton_ops import triton

if triton is not None:
    import triton.language as tl

    BIG = tl.constexpr(2147483647)  # "no index"

    @triton.jit
    def slot_params(par_ptr, slot):
        """A slot's 1 / temperature, top-p, log min-p (-inf without min-p) and top-k (0: none)."""
        p = par_ptr + slot * 4
        return 1.0 / tl.load(p), tl.load(p + 1), tl.log(tl.load(p + 2)), tl.load(p + 3)

    @triton.jit
    def chunk_logits(x, c, V, CHUNK_: tl.constexpr):
        """Chunk c of the row at x: (its indices, its logits in float32, NaNs and the places past
        V as -inf: they never count)."""
        offs = c * CHUNK_ + tl.arange(0, CHUNK_)
        v = tl.load(x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        return offs, tl.where(v != v, float("-inf"), v)

    @triton.jit
    def uniform(seed, key, r, ROUNDS_: tl.constexpr):
        return tl.sum(tl.rand(seed, tl.full((1,), 0, tl.int32) + (key * ROUNDS_ + r).to(tl.int32)), axis=0)

    @triton.jit
    def degenerate(total):
        return (total != total) | (total <= 0.0) | (total == float("inf"))
