"""LoRA's shrink moved to the launch before: `decode_linear(..., shrink_next=)` adds the next
linear's A[slot] @ norm(output) into a per-row h from its epilogue, `lora_shrink_rows` does
the same from a tensor (the embeddings, attention's output), and `decode_linear(..., h=)`
only expands. Each piece against float64 on the same inputs, and a producer -> consumer
chain against the consumer with its LoRA computed inside its own launch.
"""

from __future__ import annotations

import os

import pytest
import torch

from tasktune.serve import triton_linear
from tasktune.serve.triton_linear import decode_linear, linear_config
from tasktune.serve.triton_shrink import lora_shrink_rows
from test_triton_linear import make, reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not triton_linear.available(DEVICE),
                                reason="Triton cannot run here (no CUDA, and TRITON_INTERPRET is not 1)")
IDS = [3, 0, -1, 3, 5, 0, 1]  # 4 distinct adapters, repeats, a row without one
MANY = [4, 0, -1, 2, 5, 1, 3]  # 6: more than one tensor-core product's worth (shrink_rows' U = 4)


def shrink_reference(x, A, ids, nw=None):
    """float64 h[m] = A[ids[m]] @ (x[m] * nw), 0 for rows without an adapter."""
    act = x.double() * (nw.double() if nw is not None else 1)
    h = torch.zeros(x.shape[0], A.shape[1], dtype=torch.float64, device=x.device)
    for m, slot in enumerate(ids.tolist()):
        if slot >= 0:
            h[m] = A[slot].double() @ act[m]
    return h


def close(got, want, rel):
    assert (got.double() - want).abs().max().item() <= rel * want.abs().max().item()


@pytest.mark.parametrize("norm,rows", [(False, IDS), (True, IDS), (True, MANY)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrink_rows_launch_equals_float64(norm, rows, dtype):
    g = torch.Generator().manual_seed(0)
    M, K, ra, slots = len(IDS), 200, 48, 6
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    A = (torch.randn(slots, ra, K, generator=g) * K ** -0.5).to(DEVICE, dtype)
    nw = (torch.rand(K, generator=g) + 0.5).to(DEVICE, dtype) if norm else None
    ids = torch.tensor(rows, device=DEVICE)
    h = torch.zeros(M, ra, device=DEVICE)
    lora_shrink_rows(x, A, ids, h, nw)
    # bf16: x * nw is rounded to bf16 before the product, as the linear's own loads round it
    close(h, shrink_reference(x, A, ids, nw), 1e-5 if dtype == torch.float32 and INTERPRET else 2e-2)
    assert h[2].abs().sum().item() == 0  # the row without an adapter
    with pytest.raises(ValueError, match="lora_shrink_rows"):
        lora_shrink_rows(x, A, ids, torch.zeros(M, ra + 1, device=DEVICE))


@pytest.mark.parametrize("name", ["qkv", "gate_up", "o"])
@pytest.mark.parametrize("split_k,batch", [(1, IDS), (3, IDS), (3, MANY)])
def test_expand_only_from_a_given_h_equals_eager(name, split_k, batch):
    dtype = torch.float32
    kw = {"qkv": dict(bias=True, norm=True, modules=3), "gate_up": dict(norm=True, swiglu=True, modules=2),
          "o": dict(residual=True, modules=1)}[name]
    rows = {"qkv": 96, "gate_up": 2 * 80, "o": 64}[name]
    args = make(len(IDS), rows, 72, dtype=dtype, seed=3, slots=6, **kw)
    A, B, scaling, _ = args["lora"]
    ids = torch.tensor(batch, device=DEVICE)
    args["lora"] = (A, B, scaling, ids)
    h = shrink_reference(args["x"], A, ids, args["norm"][0] if args["norm"] else None).float()
    M, N = len(IDS), rows // 2 if args["swiglu"] else rows
    cfg = linear_config(M, N, 72, split_k=split_k, block_n=16)
    got = decode_linear(args["x"], args["W"], args["bias"], args["residual"], norm=args["norm"], swiglu=args["swiglu"],
                        lora=args["lora"], bounds=args["bounds"], h=h, config=cfg)
    close(got, reference(**args), 1e-5 if INTERPRET else 5e-3)
    assert int(triton_linear._counter_buffer(got.device).abs().sum()) == 0
    with pytest.raises(ValueError, match="h"):
        decode_linear(args["x"], args["W"], lora=args["lora"], bounds=args["bounds"], swiglu=args["swiglu"],
                      h=h[:, 1:].contiguous())


@pytest.mark.parametrize("producer", ["residual", "swiglu"])
@pytest.mark.parametrize("dtype,rows", [(torch.float32, IDS), (torch.bfloat16, IDS), (torch.float32, MANY)])
def test_epilogue_shrink_of_the_output_feeds_the_next_linear(producer, dtype, rows):
    """A producer's shrink_next leaves in h the consumer's shrink of the stored output, and the
    consumer expanding that h equals the consumer computing its LoRA inside its own launch."""
    g = torch.Generator().manual_seed(5)
    M, K, N, slots, r = len(IDS), 64, 80, 6, 8
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE, dtype)  # noqa: E731
    ids = torch.tensor(rows, device=DEVICE)
    x = rnd(M, K)
    if producer == "residual":  # o or down: the next is a normed fused linear (gate_up or qkv)
        prod = dict(weight=rnd(N, K, scale=K ** -0.5), residual=rnd(M, N))
        nw_next = (torch.rand(N, generator=g) + 0.5).to(DEVICE, dtype)
    else:  # gate_up: the next (down) reads silu(gate) * up, without a norm
        prod = dict(weight=rnd(2 * N, K, scale=K ** -0.5), swiglu=True)
        nw_next = None
    modules = 2 if nw_next is not None else 1
    A_next = rnd(slots, modules * r, N, scale=N ** -0.5)
    B_next = rnd(slots, 2 * 48 if modules == 2 else 48, r, scale=0.3)
    scaling = (torch.rand(slots, generator=g) + 0.5).to(DEVICE)
    h = torch.zeros(M, modules * r, device=DEVICE)
    for split_k in (1, 2):
        h.zero_()
        cfg = linear_config(M, N, K, split_k=split_k, block_n=16)
        y = decode_linear(x, **prod, shrink_next=(A_next, nw_next, ids, h), config=cfg)
        torch.testing.assert_close(y, decode_linear(x, **prod, config=cfg))  # the output itself is unchanged
        close(h, shrink_reference(y, A_next, ids, nw_next), 1e-5 if dtype == torch.float32 and INTERPRET else 2e-2)
    W_next = rnd(B_next.shape[1], N, scale=N ** -0.5)
    lora = (A_next, B_next, scaling, ids)
    consumer = dict(norm=(nw_next, 1e-6) if nw_next is not None else None, swiglu=modules == 2, lora=lora,
                    bounds=(48,) if modules == 2 else ())
    got = decode_linear(y, W_next, h=h, **consumer)
    want = decode_linear(y, W_next, **consumer)
    close(got, want.double(), 1e-5 if dtype == torch.float32 and INTERPRET else 2e-2)
    with pytest.raises(ValueError, match="shrink_next"):
        decode_linear(x, **prod, shrink_next=(A_next, nw_next, ids, h[:, :-1].contiguous()))
