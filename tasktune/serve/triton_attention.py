"""Decode attention in Triton: one query token per sequence against its KV-cache slot.

The decode step (row b = KV slot b, `decoder.Decoder.decode`) attended through
`F.scaled_dot_product_attention` over a view of the cache with an additive mask: on an
H200 that was cuDNN's flash kernel (tiles of 64 query rows for the 7 query heads of a
Qwen2.5-0.5B KV head) plus two copies of the strided K and V views per layer, 11 us a
layer for 6 MB of keys and values. Here one program per (sequence, KV head) reads that
head's keys once for all the query heads that share it (grouped-query attention), reads
only the sequence's own keys (loads past its length are masked off), and keeps an online
softmax in fp32. A batch of 32 with 2 KV heads is only 64 such programs for 132 SMs, so on
a GPU the context can also be split into chunks attended by separate programs whose
partial softmax states the last chunk to finish combines (flash-decoding; `splits`).
Measured on an H200 (serve bench, 256-token prompts, context ~320) with the combine as a
second kernel: 7.9 us a layer against 6.8 us unsplit; with the combine inside the split
launch (the last chunk's program, as the fused linears' split-K) and PDL, 7.22 us in 2
chunks against 6.07 unsplit (session 9, bench/decode_attention_bench.py). So the context
is split only past `SPLIT_MIN_KEYS` keys a chunk.

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

from tasktune.lora.triton_ops import _pow2_at_least, available, counter_buffer, pdl_launch, sm_count, triton, use_pdl

__all__ = ["available", "decode_attention"]

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rope_tables(pos, cos_ptr, sin_ptr, HD: tl.constexpr):
        """x * cos + roll(x, HD / 2) * sin_signed (decoder.apply_rope): the rolled index and
        the position's rows of the fp32 tables."""
        offs_d = tl.arange(0, HD)
        return (offs_d + HD // 2) % HD, tl.load(cos_ptr + pos * HD + offs_d), tl.load(sin_ptr + pos * HD + offs_d)

    @triton.jit
    def _load_q(q_ptr, cos_ptr, sin_ptr, b, kv, pos, stride_qn, stride_qh,
                GROUP: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, ROPE: tl.constexpr):
        """The query heads sharing KV head kv [G_PAD, HD] (rows past GROUP are 0), rotated by
        pos when ROPE (in fp32, rounded once to q's dtype)."""
        offs_g = tl.arange(0, G_PAD)
        g_ok = offs_g < GROUP
        offs_d = tl.arange(0, HD)
        rows = q_ptr + b * stride_qn + (kv * GROUP + offs_g)[:, None] * stride_qh
        q = tl.load(rows + offs_d[None, :], mask=g_ok[:, None], other=0.0)
        if ROPE:
            rolled, cos, sin = _rope_tables(pos, cos_ptr, sin_ptr, HD)
            src = tl.load(rows + rolled[None, :], mask=g_ok[:, None], other=0.0)
            q = (q.to(tl.float32) * cos[None, :] + src.to(tl.float32) * sin[None, :]).to(q.dtype)
        return q

    @triton.jit
    def _load_k_new(kn_ptr, cos_ptr, sin_ptr, b, kv, pos, stride_knn, stride_knh, HD: tl.constexpr, ROPE: tl.constexpr):
        """This step's key for KV head kv [HD], rotated by pos when ROPE (then fp32: the
        caller's store rounds it once)."""
        offs_d = tl.arange(0, HD)
        row = kn_ptr + b * stride_knn + kv * stride_knh
        k = tl.load(row + offs_d)
        if ROPE:
            rolled, cos, sin = _rope_tables(pos, cos_ptr, sin_ptr, HD)
            k = k.to(tl.float32) * cos + tl.load(row + rolled).to(tl.float32) * sin
        return k

    @triton.jit
    def _attend_block(q, k_base, v_base, offs_l, n_keys, m, denom, acc, sm_scale, stride_kl, stride_vl,
                      HD: tl.constexpr):
        """One block of keys into the online softmax state (max m, denominator, unnormalised
        output acc): keys at offs_l >= n_keys are not read. A state with no key yet keeps
        m = -inf and adds nothing (exp(-inf) = 0)."""
        offs_d = tl.arange(0, HD)
        l_ok = offs_l < n_keys
        k = tl.load(k_base + offs_l[:, None] * stride_kl + offs_d[None, :], mask=l_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale  # [G_PAD, BLOCK_L] fp32
        s = tl.where(l_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        v = tl.load(v_base + offs_l[:, None] * stride_vl + offs_d[None, :], mask=l_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        return m_new, denom * alpha + tl.sum(p, axis=1), acc

    @triton.jit
    def _decode_attention(
        q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, cos_ptr, sin_ptr,
        sm_scale,
        stride_qn, stride_qh, stride_knn, stride_knh, stride_vnn, stride_vnh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl, stride_on, stride_oh,
        GROUP: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, BLOCK_L: tl.constexpr,
        LENGTH: tl.constexpr,  # the context bucket (a few values): a constant loop bound
        ROPE: tl.constexpr,  # rotate q and the new key by their position first (cos, sin tables)
        PDL: tl.constexpr,  # launched as a programmatic dependent launch: wait for the previous kernel here
        EARLY: tl.constexpr = False,  # triton_ops.PDL_EARLY: the next kernel may launch after the wait
    ):
        b = tl.program_id(0)
        kv = tl.program_id(1)
        if PDL:
            tl.extra.cuda.gdc_wait()
            if EARLY:
                tl.extra.cuda.gdc_launch_dependents()
        pos = tl.load(pos_ptr + b).to(tl.int32)
        n_keys = tl.minimum(pos + 1, LENGTH)
        offs_g = tl.arange(0, G_PAD)
        g_ok = offs_g < GROUP
        heads = kv * GROUP + offs_g
        offs_d = tl.arange(0, HD)
        q = _load_q(q_ptr, cos_ptr, sin_ptr, b, kv, pos, stride_qn, stride_qh, GROUP, G_PAD, HD, ROPE)
        k_new = _load_k_new(kn_ptr, cos_ptr, sin_ptr, b, kv, pos, stride_knn, stride_knh, HD, ROPE)
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
            m, denom, acc = _attend_block(q, k_base, v_base, offs_l, n_keys, m, denom, acc, sm_scale, stride_kl,
                                          stride_vl, HD)
        if PDL and not EARLY:
            tl.extra.cuda.gdc_launch_dependents()
        o = acc / denom[:, None]
        tl.store(o_ptr + b * stride_on + heads[:, None] * stride_oh + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=g_ok[:, None])


if triton is not None:

    @triton.jit
    def _decode_attention_split(
        q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, pm_ptr, pd_ptr, pacc_ptr, o_ptr, cnt_ptr,
        sm_scale,
        stride_qn, stride_qh, stride_knn, stride_knh, stride_vnn, stride_vnh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
        stride_on, stride_oh,
        GROUP: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, BLOCK_L: tl.constexpr,
        LENGTH: tl.constexpr, CHUNK: tl.constexpr, SPLITS: tl.constexpr, S_PAD: tl.constexpr, ROPE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """One (sequence, KV head, chunk of the context): the chunk's partial softmax state
        (max, denominator, unnormalised output) into the scratch buffers; the last chunk to
        finish (a counter per (sequence, KV head), left at zero) combines them. Chunks read only
        keys written by earlier steps (l < position); chunk 0 also writes this step's key and
        value into the cache and attends to the new key from registers, so no program reads
        what another writes in the same launch."""
        b = tl.program_id(0)
        kv = tl.program_id(1)
        c = tl.program_id(2)
        if PDL:
            tl.extra.cuda.gdc_wait()
        pos = tl.load(pos_ptr + b).to(tl.int32)
        n_old = tl.minimum(pos, LENGTH)  # keys already in the cache that this row attends
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, HD)
        q = _load_q(q_ptr, cos_ptr, sin_ptr, b, kv, pos, stride_qn, stride_qh, GROUP, G_PAD, HD, ROPE)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + kv * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + kv * stride_vh
        m = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
        denom = tl.zeros((G_PAD,), dtype=tl.float32)
        acc = tl.zeros((G_PAD, HD), dtype=tl.float32)
        if c == 0:
            k_new = _load_k_new(kn_ptr, cos_ptr, sin_ptr, b, kv, pos, stride_knn, stride_knh, HD, ROPE)
            k_new = k_new.to(k_ptr.dtype.element_ty)
            v_new = tl.load(vn_ptr + b * stride_vnn + kv * stride_vnh + offs_d).to(v_ptr.dtype.element_ty)
            tl.store(k_base + pos * stride_kl + offs_d, k_new)
            tl.store(v_base + pos * stride_vl + offs_d, v_new)
            if pos < LENGTH:  # the new key is inside this bucket's context: attend to it
                s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * sm_scale  # [G_PAD]
                m = s_new
                denom = tl.full((G_PAD,), 1.0, dtype=tl.float32)
                acc = tl.zeros((G_PAD, HD), dtype=tl.float32) + v_new.to(tl.float32)[None, :]
        for start in range(0, CHUNK, BLOCK_L):  # blocks past n_old load nothing
            offs_l = c * CHUNK + start + tl.arange(0, BLOCK_L)
            m, denom, acc = _attend_block(q, k_base, v_base, offs_l, n_old, m, denom, acc, sm_scale, stride_kl,
                                          stride_vl, HD)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        pair = b * tl.num_programs(1) + kv
        part = pair * SPLITS + c
        tl.store(pm_ptr + part * G_PAD + offs_g, m)
        tl.store(pd_ptr + part * G_PAD + offs_g, denom)
        tl.store(pacc_ptr + (part * G_PAD + offs_g[:, None]) * HD + offs_d[None, :], acc)
        # the last chunk of this (sequence, KV head) to finish combines them all (no second launch)
        arrived = tl.atomic_add(cnt_ptr + pair, 1, sem="acq_rel")
        if arrived == SPLITS - 1:
            _combine_splits(pm_ptr, pd_ptr, pacc_ptr, o_ptr, stride_on, stride_oh, b, kv, pair, GROUP, G_PAD, HD,
                            SPLITS, S_PAD)
            tl.store(cnt_ptr + pair, 0)

    @triton.jit
    def _combine_splits(
        pm_ptr, pd_ptr, pacc_ptr, o_ptr, stride_on, stride_oh, b, kv, pair,
        GROUP: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, SPLITS: tl.constexpr, S_PAD: tl.constexpr,
    ):
        """The chunks' partial states of one (sequence, KV head) -> its output rows."""
        offs_s = tl.arange(0, S_PAD)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, HD)
        s_ok = offs_s < SPLITS
        part = pair * SPLITS + offs_s  # [S_PAD]
        idx = part[:, None] * G_PAD + offs_g[None, :]  # [S_PAD, G_PAD]
        m = tl.load(pm_ptr + idx, mask=s_ok[:, None], other=float("-inf"), cache_modifier=".cg")
        d = tl.load(pd_ptr + idx, mask=s_ok[:, None], other=0.0, cache_modifier=".cg")
        m_all = tl.max(m, axis=0)  # [G_PAD]; every row attends at least one key, so finite
        w = tl.exp(m - m_all[None, :])  # [S_PAD, G_PAD]; 0 for chunks without keys
        denom = tl.sum(w * d, axis=0)
        acc = tl.load(pacc_ptr + idx[:, :, None] * HD + offs_d[None, None, :], mask=s_ok[:, None, None], other=0.0,
                      cache_modifier=".cg")
        o = tl.sum(acc * w[:, :, None], axis=0) / denom[:, None]  # [G_PAD, HD]
        heads = kv * GROUP + offs_g
        tl.store(o_ptr + b * stride_on + heads[:, None] * stride_oh + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=(offs_g < GROUP)[:, None])


@torch.library.custom_op("tasktune::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     positions: torch.Tensor, length: int, cos: torch.Tensor | None = None,
                     sin: torch.Tensor | None = None, splits: int = 0) -> torch.Tensor:
    """q: [N, H, hd], k, v: [N, kv_heads, hd] (this step's token), k_cache, v_cache: one
    layer [slots >= N, kv_heads, max_len, hd], positions: [N] -> [N, H, hd]. Writes k[n], v[n]
    at [n, :, positions[n]] of the caches, then attends (one kernel: no separate write).
    cos, sin: fp32 rotary tables [>= max_len, hd] (Decoder.rope_table, sin sign-folded):
    q and k are then rotated here, by their position, instead of by a kernel of their own.
    splits: chunks of the context attended by separate programs and then combined
    (flash-decoding), so that a small batch still fills the GPU; 0 = enough chunks for
    about two programs per SM (one, without a split, on the CPU)."""
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
    g_pad = _pow2_at_least(group, 16)
    k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    n_blocks = -(-length // BLOCK_L)
    splits = min(splits if splits > 0 else _auto_splits(n * kv_heads, length, q.device), n_blocks)
    chunk_blocks = -(-n_blocks // max(splits, 1))
    splits = -(-n_blocks // chunk_blocks)
    tables = (cos if rope else q, sin if rope else q)
    strides = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
    )
    if splits == 1:
        _decode_attention[(n, kv_heads)](
            q, k, v, k_cache, v_cache, positions, out, *tables, hd ** -0.5, *strides, out.stride(0), out.stride(1),
            GROUP=group, G_PAD=g_pad, HD=hd, BLOCK_L=BLOCK_L, LENGTH=length, ROPE=rope,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES, **pdl_launch(q.device),
        )
        return out
    parts = n * kv_heads * splits * g_pad
    m = torch.empty(parts, dtype=torch.float32, device=q.device)
    d = torch.empty(parts, dtype=torch.float32, device=q.device)
    acc = torch.empty(parts * hd, dtype=torch.float32, device=q.device)
    counters = _counter_buffer(q.device, n * kv_heads)
    pdl = use_pdl(q.device)
    _decode_attention_split[(n, kv_heads, splits)](
        q, k, v, k_cache, v_cache, positions, *tables, m, d, acc, out, counters, hd ** -0.5, *strides,
        out.stride(0), out.stride(1),
        GROUP=group, G_PAD=g_pad, HD=hd, BLOCK_L=BLOCK_L, LENGTH=length, CHUNK=chunk_blocks * BLOCK_L, SPLITS=splits,
        S_PAD=_pow2_at_least(splits, 2), ROPE=rope, PDL=pdl, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out




COUNTERS = 1 << 16


def _counter_buffer(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (sequence, KV head), that every split launch leaves at
    zero; one fixed buffer per device (CUDA graphs keep pointers to it)."""
    if size > COUNTERS:
        raise ValueError(f"{size} (sequence, KV head) pairs: the split attention counts at most {COUNTERS}")
    return counter_buffer("decode_attention", device, COUNTERS)


# keys a loop iteration reads, and the unsplit launch's warps and stages: 128 / 4 / 3 took
# 6.4 us a layer against 7.2 for 64-key blocks on an H200 at the serve bench's work (bench/
# decode_attention_bench.py; reading the first block before the PDL wait, with the new key
# put in from registers, measured slower: 8.8)
BLOCK_L = 128
NUM_WARPS, NUM_STAGES = 4, 3


# splits=0 means this many chunks when > 0 (benchmarks set 1 to time the kernel without the
# split); 0: `_auto_splits`.
default_splits = 0


SPLIT_MIN_KEYS = 1024


def _auto_splits(programs: int, length: int, device: torch.device) -> int:
    """Chunks per (sequence, KV head): about two programs per SM, but no chunk shorter than
    SPLIT_MIN_KEYS keys (short contexts run faster unsplit); 1 on the CPU."""
    if default_splits > 0:
        return default_splits
    if device.type != "cuda":
        return 1
    return max(1, min(-(-2 * sm_count(device) // max(programs, 1)), length // SPLIT_MIN_KEYS))


@decode_attention.register_fake
def _(q, k, v, k_cache, v_cache, positions, length, cos=None, sin=None, splits=0):
    return q.new_empty(q.shape)
