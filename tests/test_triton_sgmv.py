"""The segmented LoRA kernels (tasktune/lora/triton_sgmv.py) against the torch path.

Run where the BGMV kernel tests run (the GPU, or the CPU under TRITON_INTERPRET=1). The
reference is y + the torch segmented delta in float64 on the same inputs, rounded once.
"""

from __future__ import annotations

import pytest
import torch

from tasktune.lora import triton_sgmv
from test_triton_ops import DEVICE, TOL, make, needs_kernels


def reference(y, x, A, B, scaling, seg_ids, seg, bounds=()):
    """Each module's delta on its own columns, every row under its segment's adapter; on a
    GPU with half-precision weights A @ x rounded to their dtype first, as the kernel's
    tensor-core expand (and PEFT) rounds it."""
    d, r = torch.float64, B.shape[2]
    ids = seg_ids.repeat_interleave(seg)
    out = y.to(d).clone()
    edges = [0, *bounds, y.shape[1]]
    rounded = DEVICE == "cuda" and B.dtype != torch.float32
    for m, (lo, hi) in enumerate(zip(edges, edges[1:])):
        h = torch.einsum("nk,nrk->nr", x.to(d), A[ids.clamp(min=0), m * r:(m + 1) * r].to(d))
        if rounded:
            h = h.to(B.dtype).to(d)
        delta = torch.einsum("nr,nor->no", h, B[ids.clamp(min=0), lo:hi].to(d)) * scaling[ids.clamp(min=0)].to(d)[:, None]
        out[:, lo:hi] += torch.where((ids >= 0)[:, None], delta, 0.0)
    return out.to(y.dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seg,seg_ids,d_in,d_out,r,bounds", [
    (32, [2, -1, 0, 2], 300, 200, 16, ()),  # ragged feature sizes, a segment without adapter
    (64, [1], 896, 1152, 8, (896, 1024)),  # one sequence, fused qkv (three modules), rank padded to 16
    (48, [0, 1, 1], 130, 260, 16, (100,)),  # 16-row tiles (48 = 3 x 16), a bound inside a column tile
])
def test_matches_torch_reference(dtype, seg, seg_ids, d_in, d_out, r, bounds):
    modules = len(bounds) + 1
    n = seg * len(seg_ids)
    x, A, B, scaling, y = make(n, d_in, d_out, r * modules, 3, dtype, seed=seg)
    A = A.contiguous()
    B = B[:, :, :r].contiguous()
    ids = torch.tensor(seg_ids, device=DEVICE)
    want = reference(y, x, A, B, scaling, ids, seg, bounds)
    untouched = y.clone()
    got = triton_sgmv.sgmv_apply_(y, x, A, B, scaling, ids, seg, bounds)
    assert got is y
    torch.testing.assert_close(y, want, **TOL[dtype])
    none = ids.repeat_interleave(seg) < 0
    assert torch.equal(y[none], untouched[none])  # rows of a segment without adapter: not written


def test_tile_rows():
    assert [triton_sgmv.block_m(s) for s in (32, 64, 512, 48, 200, 8, 30)] == [32, 64, 64, 16, 0, 0, 0]


@needs_kernels
def test_rejects_segments_that_do_not_tile():
    x, A, B, scaling, y = make(40, 32, 32, 16, 2, torch.float32)
    with pytest.raises(ValueError, match="segments"):
        triton_sgmv.sgmv_apply_(y, x, A, B, scaling, torch.zeros(2, dtype=torch.long, device=DEVICE), 20)
