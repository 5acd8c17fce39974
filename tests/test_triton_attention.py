"""The Triton decode-attention kernel (tasktune/serve/triton_attention.py) against the
path it replaces: `grouped_attention` (SDPA) over the cache view with the position mask.
On the CPU it runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

from tasktune.serve import triton_attention
from tasktune.serve.decoder import grouped_attention

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
pytestmark = pytest.mark.skipif(not triton_attention.available(DEVICE), reason="needs Triton (GPU or interpreter)")


def reference(q, k, v, positions, length):
    """q [N, H, hd]; k, v: the cache with this step's keys already written."""
    n = q.shape[0]
    mask = torch.arange(length, device=q.device).view(1, 1, 1, length) <= positions.view(n, 1, 1, 1)
    out = grouped_attention(q.unsqueeze(2), k[:n, :, :length], v[:n, :, :length], mask)  # [N, H, 1, hd]
    return out.squeeze(2)


CASES = {  # name: (rows, slots, heads, kv_heads, head_dim, max_len, length, positions)
    "qwen gqa 7": (5, 6, 14, 2, 64, 200, 130, [0, 63, 64, 129, 199]),  # 199 >= length: capped at the bucket
    "mha": (3, 3, 4, 4, 16, 80, 80, [10, 79, 40]),
    "one row, one key": (1, 2, 8, 2, 32, 16, 16, [0]),
}


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_sdpa_with_the_position_mask(case, splits):
    """splits=3: the context in chunks attended apart, then combined by the last chunk to
    finish (flash-decoding in one launch), which leaves the counters at zero."""
    n, slots, heads, kvh, hd, max_len, length, positions = CASES[case]
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(n, heads + 2 * kvh, hd, generator=g).to(DEVICE)
    q = qkv[:, :heads]  # a row-strided view, as the decoder passes it
    k = torch.randn(slots, kvh, max_len, hd, generator=g).to(DEVICE)
    v = torch.randn(slots, kvh, max_len, hd, generator=g).to(DEVICE)
    pos = torch.tensor(positions, device=DEVICE)
    k_new, v_new = qkv[:, heads:heads + kvh], qkv[:, heads + kvh:]  # row-strided views too
    kc, vc = k.clone(), v.clone()
    out = torch.ops.tasktune.decode_attention(q, k_new, v_new, kc, vc, pos, length, splits=splits)
    rows = torch.arange(n, device=DEVICE)
    k[rows, :, pos], v[rows, :, pos] = k_new, v_new  # what the kernel writes, written by torch
    assert torch.equal(kc, k) and torch.equal(vc, v)  # and nothing else
    torch.testing.assert_close(out, reference(q, k, v, pos, length), rtol=1e-5, atol=1e-5)
    if splits > 1:
        assert int(triton_attention._counter_buffer(out.device, 0).abs().sum()) == 0


@pytest.mark.parametrize("splits", [1, 4])
def test_keys_past_a_rows_position_are_never_read(splits):
    # non-finite values past each row's position (stale cache) must not reach it
    n, heads, kvh, hd, L = 3, 4, 2, 16, 64
    q = torch.randn(n, heads, hd).to(DEVICE)
    k, v = torch.randn(4, kvh, L, hd).to(DEVICE), torch.randn(4, kvh, L, hd).to(DEVICE)
    pos = torch.tensor([5, 20, 63], device=DEVICE)
    for b, p in enumerate(pos.tolist()):
        k[b, :, p:] = float("nan")  # position p itself is overwritten with this step's key
        v[b, :, p:] = float("inf")
    k_new, v_new = torch.randn(n, kvh, hd).to(DEVICE), torch.randn(n, kvh, hd).to(DEVICE)
    out = torch.ops.tasktune.decode_attention(q, k_new, v_new, k, v, pos, L, splits=splits)
    assert torch.isfinite(out).all()
    clean = k.nan_to_num(0.0), v.nan_to_num(0.0, posinf=0.0)
    torch.testing.assert_close(out, reference(q, *clean, pos, L), rtol=1e-5, atol=1e-5)


def test_rejects_shapes_it_cannot_run():
    q = torch.randn(2, 6, 24).to(DEVICE)  # head_dim 24: not a power of two
    k = torch.randn(2, 2, 8, 24).to(DEVICE)
    with pytest.raises(ValueError, match="decode_attention"):
        torch.ops.tasktune.decode_attention(q, k[:, :, 0], k[:, :, 0], k, k, torch.zeros(2, dtype=torch.long, device=DEVICE), 8)


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_rotary_inside_the_kernel_equals_rotating_first(case, splits):
    """Given the rotary tables, the kernel rotates q and the new key by their positions:
    the same output and cache as `decoder.apply_rope` first, then the kernel without them."""
    from tasktune.serve.decoder import apply_rope

    n, slots, heads, kvh, hd, max_len, length, positions = CASES[case]
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(n, heads + 2 * kvh, hd, generator=g).to(DEVICE)
    k0 = torch.randn(slots, kvh, max_len, hd, generator=g).to(DEVICE)
    v0 = torch.randn(slots, kvh, max_len, hd, generator=g).to(DEVICE)
    pos = torch.tensor(positions, device=DEVICE)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.cat([torch.arange(max_len).float()[:, None] * inv] * 2, dim=-1)
    sin = emb.sin()
    sin[:, :hd // 2].neg_()
    cos, sin = emb.cos().to(DEVICE), sin.to(DEVICE)
    rotated = apply_rope(qkv[:, :heads + kvh], cos[pos].unsqueeze(1), sin[pos].unsqueeze(1))
    kc, vc = k0.clone(), v0.clone()
    want = torch.ops.tasktune.decode_attention(rotated[:, :heads], rotated[:, heads:], qkv[:, heads + kvh:], kc, vc,
                                               pos, length)
    kc2, vc2 = k0.clone(), v0.clone()
    got = torch.ops.tasktune.decode_attention(qkv[:, :heads], qkv[:, heads:heads + kvh], qkv[:, heads + kvh:], kc2,
                                              vc2, pos, length, cos, sin, splits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc2, kc, rtol=1e-6, atol=1e-6)
    assert torch.equal(vc2, vc)
