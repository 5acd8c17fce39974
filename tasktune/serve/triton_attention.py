"""Decode attention in Triton: one query token per sequence against its KV-cache slot.

The decode step (row b = KV slot b, `decoder.Decoder.decode`) attended through
`F.scaled_dot_product_attention` over a view of the cache with an additive mask: on an
H200 that was cuDNN's flash kernel (tiles of 64 query rows for the 7 query heads of a
Qwen2.5-0.5B KV head) plus two copies of the strided K and V views per layer, 11 us a
layer for 6 MB of keys and values. Here one program per (sequence, KV head) reads that
head's keys once for all the query heads that share it (grouped-query attention), reads
only the sequence's own keys (loads past its length are masked off), and keeps an online
softmax in fp32 (flash-decoding without the split: contexts here are a few hundred keys).

`decode_attention(q, k, v, k_cache, v_cache, positions, length)`: q [N, H, hd], this step's
k, v [N, kv_heads, hd] (row-strided views allowed), one layer of the cache [slots,
kv_heads, max_len, hd]; row n's key and value are written at positions[n] of slot n, then
it attends to keys 0..min(positions[n], length - 1) of slot n. Writing inside the kernel
also spares the copy torch.compile added after its own cache write (a graph input view).
Given the rotary tables, it also applies rotary embedding to q and the new key itself,
so the decode step reads q, k, v as views of the qkv GEMM's output with no kernel between. Registered as `torch.ops.tasktune.decode_attention`
so torch.compile keeps it whole. Runs on the CPU under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch

from tasktune.lora.triton_ops import _pow2_at_least, available, triton

__all__ = ["available", "decode_attention"]

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _decode_attention(
        q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, cos_ptr, sin_ptr,
        sm_scale,
        stride_qn, stride_qh, stride_knn, stride_knh, stride_vnn, stride_vnh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl, stride_on, stride_oh,
        GROUP: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, BLOCK_L: tl.constexpr,
        LENGTH: tl.constexpr,  # the context bucket (a few values): a constant loop bound
        ROPE: tl.constexpr,  # rotate q and the new key by their position first (cos, sin tables)
    ):
        b = tl.program_id(0)
        kv = tl.program_id(1)
        pos = tl.load(pos_ptr + b).to(tl.int32)
        n_keys = tl.minimum(pos + 1, LENGTH)
        offs_g = tl.arange(0, G_PAD)
        g_ok = offs_g < GROUP
        heads = kv * GROUP + offs_g
        offs_d = tl.arange(0, HD)
        q_rows = q_ptr + b * stride_qn + heads[:, None] * stride_qh
        q = tl.load(q_rows + offs_d[None, :], mask=g_ok[:, None], other=0.0)
        kn_row = kn_ptr + b * stride_knn + kv * stride_knh
        k_new = tl.load(kn_row + offs_d)
        if ROPE:  # x * cos + roll(x, HD / 2) * sin_signed (decoder.apply_rope), in fp32, rounded once
            rolled = (offs_d + HD // 2) % HD
            cos = tl.load(cos_ptr + pos * HD + offs_d)
            sin = tl.load(sin_ptr + pos * HD + offs_d)
            q_src = tl.load(q_rows + rolled[None, :], mask=g_ok[:, None], other=0.0)
            q = (q.to(tl.float32) * cos[None, :] + q_src.to(tl.float32) * sin[None, :]).to(q.dtype)
            k_new = k_new.to(tl.float32) * cos + tl.load(kn_row + rolled).to(tl.float32) * sin
        k_base = k_ptr + b.to(tl.int64) * stride_kb + kv * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + kv * stride_vh
        # this token's key and value go into the cache first (only this program reads them)
        tl.store(k_base + pos * stride_kl + offs_d, k_new.to(k_ptr.dtype.element_ty))
        tl.store(v_base + pos * stride_vl + offs_d, tl.load(vn_ptr + b * stride_vnn + kv * stride_vnh + offs_d))
        tl.debug_barrier()  # the stores are visible to every thread of the program before the loop reads them
        m = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
        denom = tl.zeros((G_PAD,), dtype=tl.float32)
        acc = tl.zeros((G_PAD, HD), dtype=tl.float32)
        for start in range(0, LENGTH, BLOCK_L):  # blocks past n_keys load nothing (masked)
            offs_l = start + tl.arange(0, BLOCK_L)
            l_ok = offs_l < n_keys
            k = tl.load(k_base + offs_l[:, None] * stride_kl + offs_d[None, :], mask=l_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale  # [G_PAD, BLOCK_L] fp32
            s = tl.where(l_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(v_base + offs_l[:, None] * stride_vl + offs_d[None, :], mask=l_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            denom = denom * alpha + tl.sum(p, axis=1)
            m = m_new
        o = acc / denom[:, None]
        tl.store(o_ptr + b * stride_on + heads[:, None] * stride_oh + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=g_ok[:, None])


@torch.library.custom_op("tasktune::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     positions: torch.Tensor, length: int, cos: torch.Tensor | None = None,
                     sin: torch.Tensor | None = None) -> torch.Tensor:
    """q: [N, H, hd], k, v: [N, kv_heads, hd] (this step's token), k_cache, v_cache: one
    layer [slots >= N, kv_heads, max_len, hd], positions: [N] -> [N, H, hd]. Writes k[n], v[n]
    at [n, :, positions[n]] of the caches, then attends (one kernel: no separate write).
    cos, sin: fp32 rotary tables [>= max_len, hd] (Decoder.rope_table, sin sign-folded):
    q and k are then rotated here, by their position, instead of by a kernel of their own."""
    n, heads, hd = q.shape
    slots, kv_heads, max_len, _ = k_cache.shape
    rope = cos is not None
    if (heads % kv_heads or slots < n or k_cache.shape[3] != hd or v_cache.shape != k_cache.shape
            or k.shape != (n, kv_heads, hd) or v.shape != k.shape or hd & (hd - 1) or not 0 < length <= max_len
            or any(t.stride(-1) != 1 for t in (q, k, v, k_cache, v_cache))
            or (rope and (sin is None or cos.shape != sin.shape or cos.shape[0] < max_len or cos.shape[1] != hd
                          or cos.dtype != torch.float32 or not (cos.is_contiguous() and sin.is_contiguous())))):
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"cache {tuple(k_cache.shape)}, length {length}"
                         + (f", rope tables {tuple(cos.shape)} {cos.dtype}" if rope else ""))
    out = torch.empty(n, heads, hd, dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    group = heads // kv_heads
    k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    _decode_attention[(n, kv_heads)](
        q, k, v, k_cache, v_cache, positions, out, cos if rope else q, sin if rope else q, hd ** -0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        GROUP=group, G_PAD=_pow2_at_least(group, 16), HD=hd, BLOCK_L=64, LENGTH=length, ROPE=rope,
    )
    return out


@decode_attention.register_fake
def _(q, k, v, k_cache, v_cache, positions, length, cos=None, sin=None):
    return q.new_empty(q.shape)
