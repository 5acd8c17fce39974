"""lora_delta: both torch paths against a float64 per-row loop, values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tasktune.lora.ops import lora_delta, lora_delta_gathered, lora_delta_segmented

PATHS = {"segmented": lora_delta_segmented, "gathered": lora_delta_gathered, "dispatch": lora_delta}


def make(n_rows=50, d_in=12, d_out=10, ranks=(5, 3, 1, 4), seed=0, ids=None):
    """Random stacked adapters with different ranks, zero-padded to the largest."""
    g = torch.Generator().manual_seed(seed)
    n, r_max = len(ranks), max(ranks)
    A = torch.randn(n, r_max, d_in, generator=g)
    B = torch.randn(n, d_out, r_max, generator=g)
    for k, r in enumerate(ranks):
        A[k, r:] = 0
        B[k, :, r:] = 0
    scaling = torch.rand(n, generator=g) + 0.5
    x = torch.randn(n_rows, d_in, generator=g)
    if ids is None:
        ids = torch.randint(-1, n, (n_rows,), generator=g)
    return x, A, B, scaling, ids


def reference(x, A, B, scaling, ids, ranks):
    """float64, one row at a time, using only each adapter's true (unpadded) rank."""
    out = torch.zeros(x.shape[0], B.shape[1], dtype=torch.float64)
    for i, k in enumerate(ids.tolist()):
        if k < 0:
            continue
        r = ranks[k]
        a, b = A[k, :r].double(), B[k, :, :r].double()
        out[i] = scaling[k].double() * (b @ (a @ x[i].double()))
    return out


@pytest.mark.parametrize("path", list(PATHS))
def test_values_match_float64_loop(path):
    ranks = (5, 3, 1, 4)
    x, A, B, scaling, ids = make(ranks=ranks)
    assert (ids == -1).any() and len(set(ids.tolist())) == 5
    with torch.no_grad():
        got = PATHS[path](x, A, B, scaling, ids)
    assert got.shape == (50, 10) and got.dtype == torch.float32
    assert_close(got.double(), reference(x, A, B, scaling, ids, ranks), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[ids == -1], torch.zeros_like(got[ids == -1]))


def test_paths_agree_with_each_other():
    x, A, B, scaling, ids = make(n_rows=33, seed=3)
    with torch.no_grad():
        assert_close(lora_delta_segmented(x, A, B, scaling, ids), lora_delta_gathered(x, A, B, scaling, ids))


@pytest.mark.parametrize("ids", [[2] * 7, [-1] * 7, [], [0, 3, 3, -1, 1, 0, 2]])
@pytest.mark.parametrize("path", list(PATHS))
def test_edge_batches(path, ids):
    """One adapter for the whole batch (the fast path), no adapter at all, no rows."""
    ranks = (5, 3, 1, 4)
    ids_t = torch.tensor(ids, dtype=torch.long)
    x, A, B, scaling, _ = make(n_rows=len(ids), ranks=ranks, ids=ids_t)
    with torch.no_grad():
        got = PATHS[path](x, A, B, scaling, ids_t)
    assert got.shape == (len(ids), 10)
    assert_close(got.double(), reference(x, A, B, scaling, ids_t, ranks), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["segmented", "gathered"])
def test_gradients_match_float64_autograd(path):
    ranks = (5, 3, 1, 4)
    x, A, B, scaling, ids = make(n_rows=40, ranks=ranks, seed=1)
    weight = torch.randn(40, 10, generator=torch.Generator().manual_seed(9))

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, A, B)]
        (fn(leaves[0], leaves[1], leaves[2], scaling.to(dtype), ids) * weight.to(dtype)).sum().backward()
        return [t.grad for t in leaves]

    def ref_fn(x_, A_, B_, s_, ids_):  # the loop, differentiable, on padded stacks
        rows = [s_[k] * (B_[k] @ (A_[k] @ x_[i])) if k >= 0 else x_.new_zeros(10) for i, k in enumerate(ids_.tolist())]
        return torch.stack(rows)

    for got, want in zip(grads(PATHS[path], torch.float32), grads(ref_fn, torch.float64)):
        assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_absent_adapter_and_padding_get_exactly_zero_gradient():
    """The segmented path (used under autograd) never touches an absent adapter's weights."""
    ranks = (5, 3, 1, 4)
    ids = torch.tensor([0, 2, 2, -1, 0, 2, 0, -1])
    x, A, B, scaling, _ = make(n_rows=8, ranks=ranks, ids=ids)
    A.requires_grad_()
    B.requires_grad_()
    lora_delta(x, A, B, scaling, ids).pow(2).sum().backward()
    for k in (1, 3):  # not in the batch
        assert torch.equal(A.grad[k], torch.zeros_like(A.grad[k]))
        assert torch.equal(B.grad[k], torch.zeros_like(B.grad[k]))
    for k in (0, 2):
        r = ranks[k]
        assert A.grad[k, :r].abs().sum() > 0 and B.grad[k, :, :r].abs().sum() > 0
        assert torch.equal(A.grad[k, r:], torch.zeros_like(A.grad[k, r:]))
        assert torch.equal(B.grad[k, :, r:], torch.zeros_like(B.grad[k, :, r:]))


@pytest.mark.parametrize("path", list(PATHS))
def test_rows_without_adapter_ignore_non_finite_adapters(path):
    """A NaN in an unused slot (e.g. a half-loaded adapter) must not reach base-only rows."""
    x, A, B, scaling, _ = make(n_rows=6)
    A[0] = float("nan")
    ids = torch.tensor([-1, 1, -1, 2, 3, -1])
    with torch.no_grad():
        got = PATHS[path](x, A, B, scaling, ids)
    assert torch.isfinite(got).all()
    assert torch.equal(got[ids == -1], torch.zeros(3, 10))


def test_dispatch_uses_segmented_under_autograd():
    """Training must take the segmented path (exact zero gradients); decode the gathered one."""
    x, A, B, scaling, ids = make(n_rows=8)
    A.requires_grad_()
    out = lora_delta(x, A, B, scaling, ids)
    assert type(out.grad_fn).__name__ == "IndexAddBackward0"
    with torch.no_grad():
        assert_close(lora_delta(x, A, B, scaling, ids), lora_delta_gathered(x, A, B, scaling, ids))
