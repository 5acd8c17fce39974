"""The greedy step's fused tail (tasktune/serve/triton_lm_head.py): final RMSNorm + LM head
+ argmax in one launch, against torch: logits within bf16 rounding of the decoder's norm and
head, the argmax exactly the first maximal index of the logits it returns (ties across
programs, NaN), the next step's inputs, and its buffers left at zero for the next launch."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tasktune.serve import triton_argmax, triton_lm_head

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not triton_lm_head.available(DEVICE),
                                reason="Triton cannot run here (no CUDA, and TRITON_INTERPRET is not 1)")
EPS = 1e-6


def inputs(rows: int, k: int, vocab: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=g) * 3).to(dtype)
    nw = (1 + 0.3 * torch.randn(k, generator=g)).to(dtype)
    w = (torch.randn(vocab, k, generator=g) / k ** 0.5).to(dtype)
    return x, nw, w


def reference(x, nw, w):
    """The decoder's tail: weight * rms_norm(x) in the model's dtype, then the LM head."""
    return F.linear(nw * F.rms_norm(x, (x.shape[1],), eps=EPS), w)


def buffers_zero(device: torch.device) -> bool:
    """device: a launch's tensor's own (cuda:0, not cuda: the buffers are kept by device)."""
    keys = triton_argmax.counter_buffer("lm_head_keys", device, triton_lm_head.SLOTS * triton_lm_head.MAX_ROWS,
                                        torch.int64)
    return int(keys.abs().sum()) == 0 and int(triton_argmax.counter_buffer("lm_head", device, 1).sum()) == 0


@pytest.mark.parametrize("rows, k, vocab", [(5, 96, 1000), (1, 64, 300), (33, 80, 2 * triton_lm_head.BLOCK_N)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logits_and_argmax_against_torch(rows, k, vocab, dtype):
    x, nw, w = inputs(rows, k, vocab, dtype)
    logits, top = triton_lm_head.lm_head_argmax(x.to(DEVICE), nw.to(DEVICE), EPS, w.to(DEVICE))
    assert logits.dtype == dtype and logits.shape == (rows, vocab) and top.dtype == torch.int64
    want = reference(x.float(), nw.float(), w.float())
    tol = 0.05 if dtype == torch.bfloat16 else (1e-4 if INTERPRET else 3e-3)  # (fp32 dots are TF32 on a GPU)
    assert (logits.cpu().float() - want).abs().max().item() < tol * want.abs().max().item()
    assert top.cpu().tolist() == logits.cpu().float().argmax(-1).tolist()  # exact for its own logits
    # against the decoder's own tail: rounding may reorder near-ties, so the pick is within
    # rounding of its maximum (and for these inputs in fp32 on the CPU, the same index)
    ref = reference(x, nw, w).float()
    picked = ref.gather(1, top.cpu()[:, None])[:, 0]
    assert (ref.max(-1).values - picked).max().item() <= tol * want.abs().max().item()
    if dtype == torch.float32 and INTERPRET:
        assert top.cpu().tolist() == ref.argmax(-1).tolist()
    assert buffers_zero(top.device)


def test_ties_across_programs_take_the_first_index_and_nan_wins():
    x, nw, w = inputs(4, 64, 1000, torch.float32, seed=1)
    x, nw = x.abs() + 0.1, nw.abs() + 0.1  # every normed row positive: a row of large weights scores highest
    w[[900, 300, 5]] = 1.0  # equal maxima in programs 7, 2 and 0
    _, top = triton_lm_head.lm_head_argmax(x.to(DEVICE), nw.to(DEVICE), EPS, w.to(DEVICE))
    assert top.cpu().tolist() == [5] * 4
    w[700] = float("nan")  # NaN counts as the maximum, as in torch.argmax
    logits, top = triton_lm_head.lm_head_argmax(x.to(DEVICE), nw.to(DEVICE), EPS, w.to(DEVICE))
    assert top.cpu().tolist() == [700] * 4 == logits.cpu().argmax(-1).tolist()
    assert buffers_zero(top.device)


def test_feeds_the_next_steps_inputs_and_rejects_bad_shapes():
    x, nw, w = inputs(3, 64, 500, torch.float32, seed=2)
    state = torch.tensor([[1, 2, 3, 4], [7, 8, 9, 10]])
    active = torch.tensor([1, 0, 1])
    got = state.clone().to(DEVICE)  # (on the CPU .to is the same tensor)
    _, top = triton_lm_head.lm_head_argmax(x.to(DEVICE), nw.to(DEVICE), EPS, w.to(DEVICE),
                                           (got[0, :3], got[1, :3], active.to(DEVICE)))
    want = state.clone()
    triton_argmax.feed_next(top.cpu(), (want[0, :3], want[1, :3], active))
    assert got.cpu().tolist() == want.tolist() and want[1].tolist() == [8, 8, 10, 10]
    with pytest.raises(ValueError, match="lm_head_argmax"):
        triton_lm_head.lm_head_argmax(x.to(DEVICE), nw[:10].to(DEVICE), EPS, w.to(DEVICE))
    with pytest.raises(ValueError, match="next inputs"):
        triton_lm_head.lm_head_argmax(x.to(DEVICE), nw.to(DEVICE), EPS, w.to(DEVICE), (got[0, :2], got[1, :3], active))
