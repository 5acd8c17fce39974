"""The greedy step's argmax kernel (tasktune/serve/triton_argmax.py) against torch.argmax:
the first maximal index of each row, across chunk boundaries, with ties and NaNs."""
from __future__ import annotations

import os

import pytest
import torch

from tasktune.serve import triton_argmax

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not triton_argmax.available(DEVICE),
                                reason="Triton cannot run here (no CUDA, and TRITON_INTERPRET is not 1)")


@pytest.mark.parametrize("rows, vocab", [(3, 100), (5, 2 * triton_argmax.CHUNK + 17), (2, triton_argmax.CHUNK)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_equals_torch_argmax_with_ties_across_chunks(rows, vocab, dtype):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, vocab, generator=g).to(dtype)
    top = x.max().item() + 1
    x[0, [vocab - 1, vocab // 2, 7]] = top  # ties: the first wins, whichever chunk holds it
    x[-1, vocab - 1] = top + 1  # the last value of the last (partial) chunk
    if rows > 2:
        x[1, :] = -3.0  # a constant row: index 0
    got = triton_argmax.argmax_rows(x.to(DEVICE))
    assert got.dtype == torch.int64
    assert got.cpu().tolist() == x.float().argmax(-1).tolist()
    assert got[0].item() == 7
    assert int(triton_argmax.counter_buffer("argmax", got.device, triton_argmax.MAX_ROWS).abs().sum()) == 0


def test_nan_counts_as_the_maximum_like_torch():
    x = torch.randn(2, 300)
    x[0, 250] = float("nan")
    x[1, [5, 40]] = float("nan")
    assert triton_argmax.argmax_rows(x.to(DEVICE)).cpu().tolist() == [250, 5] == x.argmax(-1).tolist()


def test_a_row_strided_view_and_bad_shapes():
    x = torch.randn(4, 260)
    assert triton_argmax.argmax_rows(x[:, :200].to(DEVICE)).cpu().tolist() == x[:, :200].argmax(-1).tolist()
    with pytest.raises(ValueError, match="argmax_rows"):
        triton_argmax.argmax_rows(x.t().to(DEVICE))


def test_feeds_the_next_steps_inputs_like_feed_next():
    """With the step's input rows the kernel also writes the next step's: each row's token,
    its position moved on by its active flag; the rows' other inputs stay as they were."""
    x = torch.randn(5, 2 * triton_argmax.CHUNK + 3, generator=torch.Generator().manual_seed(1))
    inputs = torch.tensor([[9, 9, 9, 9, 9, 4], [10, 20, 30, 40, 50, 60], [1, -1, 2, -1, 0, 8]])
    active = torch.tensor([1, 0, 1, 1, 0])
    want = inputs.clone()
    triton_argmax.feed_next(x.argmax(-1), (want[0, :5], want[1, :5], active))
    assert want[0, :5].tolist() == x.argmax(-1).tolist() and want[1, :5].tolist() == [11, 20, 31, 41, 50]
    got = inputs.to(DEVICE)
    out = triton_argmax.argmax_rows(x.to(DEVICE), (got[0, :5], got[1, :5], active.to(DEVICE)))
    assert out.cpu().tolist() == x.argmax(-1).tolist()
    assert got.cpu().tolist() == want.tolist()
    with pytest.raises(ValueError, match="next inputs"):
        triton_argmax.argmax_rows(x.to(DEVICE), (got[0, :4], got[1, :5], active.to(DEVICE)))
