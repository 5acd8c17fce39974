"""LoRA carried between fused decode launches (tasktune/serve/triton_lora_chain.py): a
producer's epilogue (or a shrink launch) adds the next linear's shrink into an s buffer,
the next fused linear expands it inside its launch. Against the float64 reference of
test_triton_linear (RMSNorm, projection, each row's LoRA per module, SwiGLU, residual),
under the interpreter on the CPU and for real on a GPU (bench/gpu_all.sh's kernel tests)."""

from __future__ import annotations

import pytest
import torch

from test_triton_linear import DEVICE, INTERPRET, make, reference
from tasktune.serve import triton_linear, triton_lora_chain
from tasktune.serve.triton_linear import decode_linear, linear_config
from tasktune.serve.triton_lora_chain import ROLES, chain_buffers, lora_chain_shrink

pytestmark = pytest.mark.skipif(not triton_linear.available(DEVICE),
                                reason="Triton cannot run here (no CUDA, and TRITON_INTERPRET is not 1)")


def tol(want, dtype):
    scale = want.abs().max().item()
    return (1e-5 if INTERPRET else 5e-3) * scale if dtype == torch.float32 else 3e-2 * scale


@pytest.fixture(autouse=True)
def clear_buffers():
    chain_buffers(torch.device(DEVICE)).zero_()  # as a decode step leaves them for its next one


def run_consumer(args, role, config=None, chain_out=None, zero=0):
    A, B, scaling, ids = args["lora"]
    return decode_linear(args["x"], args["W"], args["bias"], args["residual"], norm=args["norm"],
                         swiglu=args["swiglu"], bounds=args["bounds"], chain_in=(B, scaling, ids, role, zero),
                         chain_out=chain_out, config=config)


CONSUMERS = {  # M, weight rows, K, options: as test_triton_linear's CASES
    "one module": (7, 64, 48, dict(residual=True, modules=1)),
    "qkv: 3 modules + norm + bias": (16, 120, 96, dict(norm=True, bias=True, modules=3)),
    "gate_up: swiglu + norm": (9, 128, 64, dict(norm=True, swiglu=True, modules=2)),
    "long K": (6, 64, 700, dict(residual=True, norm=True, modules=1)),
}


@pytest.mark.parametrize("name", list(CONSUMERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrink_launch_then_linear_equals_lora(name, dtype):
    """lora_chain_shrink (the norm's weight in it, its 1 / rms in the linear) then the fused
    linear expanding s: the same function as the linear with each row's LoRA."""
    M, rows, K, opts = CONSUMERS[name]
    args = make(M, rows, K, dtype=dtype, **opts)
    if opts["modules"] == 3:  # module boundaries on the 16-column blocks the launch takes
        args["bounds"] = (64, 96)
    A, B, scaling, ids = args["lora"]
    role = ROLES.index("qkv_proj")
    lora_chain_shrink(args["x"], A, scaling, ids, role, args["norm"][0] if args["norm"] else None)
    got = run_consumer(args, role)
    want = reference(**args)
    assert (got.double() - want).abs().max().item() <= tol(want, dtype)


@pytest.mark.parametrize("split_k", [1, 2, 3, 4])
def test_four_adapters_shared_over_the_splits(split_k):
    """UCH distinct adapters (the most a chained batch has), each split expanding its share;
    the launch clears the buffer of the role before its own and nothing else."""
    args = make(40, 96, 192, dtype=torch.float32, norm=True, modules=3, slots=6, seed=5)
    args["bounds"] = (32, 64)
    A, B, scaling, ids = args["lora"]
    ids[ids >= triton_lora_chain.UCH] = -1
    assert len(set(ids.tolist()) - {-1}) == triton_lora_chain.UCH
    s = chain_buffers(torch.device(DEVICE))
    s[1].fill_(1.0)
    s[3].fill_(1.0)
    lora_chain_shrink(args["x"], A, scaling, ids, 2, args["norm"][0])
    got = run_consumer(args, 2, config=linear_config(40, 96, 192, block_n=32, block_k=64, split_k=split_k), zero=7)
    want = reference(**args)
    assert (got.double() - want).abs().max().item() <= tol(want, torch.float32)
    cleared = torch.zeros_like(s[1], dtype=torch.bool)  # [adapter * S_RA + rank column, row]
    for m, slot in enumerate(ids.tolist()):
        if slot >= 0:  # the batch's distinct adapters in order of their first row
            u = list(dict.fromkeys(i for i in ids.tolist() if i >= 0)).index(slot)
            cleared[u * triton_lora_chain.S_RA:u * triton_lora_chain.S_RA + 7, m] = True
    assert not s[1][cleared].any() and (s[1][~cleared] == 1).all() and (s[3] == 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_k", [1, 3])
def test_a_linears_epilogue_shrinks_for_the_next(dtype, split_k):
    """o (+ residual) -> RMSNorm + gate_up + silu * up -> down (+ residual), each linear's
    epilogue making the next one's s: equals the three linears with LoRA, one by one."""
    g = torch.Generator().manual_seed(3)
    M, D, I, r, slots = 12, 64, 96, 8, 4  # at most UCH distinct adapters, as a chained batch
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE, dtype)  # noqa: E731
    ids = torch.randint(-1, slots, (M,), generator=g)
    ids[0] = 2
    ids = ids.to(DEVICE)
    scaling = (torch.rand(slots, generator=g) + 0.5).to(DEVICE)
    lora = {n: (rnd(slots, m * r, k, scale=k ** -0.5), rnd(slots, r, rows).transpose(1, 2))
            for n, (m, k, rows) in {"o": (1, D, D), "gu": (2, D, 2 * I), "down": (1, I, D)}.items()}
    W = {"o": rnd(D, D, scale=D ** -0.5), "gu": rnd(2 * I, D, scale=D ** -0.5), "down": rnd(D, I, scale=I ** -0.5)}
    x, res, nw = rnd(M, D), rnd(M, D), ((torch.rand(D, generator=g) + 0.5).to(DEVICE, dtype), 1e-6)
    cfg = lambda n, k: linear_config(M, n, k, block_n=32, block_k=32, split_k=split_k)  # noqa: E731

    def lo(n):
        return (*lora[n], scaling, ids)

    lora_chain_shrink(x, lora["o"][0], scaling, ids, 1)
    h = decode_linear(x, W["o"], residual=res, chain_in=(lora["o"][1], scaling, ids, 1, 0),
                      chain_out=(lora["gu"][0], scaling, ids, nw[0], 2), config=cfg(D, D))
    act = decode_linear(h, W["gu"], norm=nw, swiglu=True, bounds=(I,), chain_in=(lora["gu"][1], scaling, ids, 2, r),
                        chain_out=(lora["down"][0], scaling, ids, None, 3), config=cfg(I, D))
    out = decode_linear(act, W["down"], residual=h, chain_in=(lora["down"][1], scaling, ids, 3, 2 * r), config=cfg(D, I))
    want_h = reference(x, W["o"], residual=res, lora=lo("o"))
    want_act = reference(h, W["gu"], norm=nw, swiglu=True, lora=lo("gu"), bounds=(I,))  # from our h: no drift
    want_out = reference(act, W["down"], residual=h, lora=lo("down"))
    for name, got, want in (("o", h, want_h), ("gate_up", act, want_act), ("down", out, want_out)):
        assert (got.double() - want).abs().max().item() <= tol(want, dtype), name
    s = chain_buffers(torch.device(DEVICE))
    assert not s[1].any() and not s[2].any()  # read, then cleared by the launch after their reader


def test_rejects_what_it_cannot_hold():
    args = make(6, 64, 48, dtype=torch.float32, modules=1)
    A, B, scaling, ids = args["lora"]
    with pytest.raises(ValueError, match="does not go with"):
        decode_linear(args["x"], args["W"], lora=args["lora"], chain_in=(B, scaling, ids, 0, 0))
    with pytest.raises(ValueError, match="next A"):
        decode_linear(args["x"], args["W"], chain_out=(A, scaling, ids, None, 1))
    with pytest.raises(ValueError, match="rows"):
        lora_chain_shrink(args["x"], A, scaling, ids[:3], 0)
    qkv = make(6, 80, 48, dtype=torch.float32, modules=3, seed=2)
    bounds = (40, 56)  # a module boundary inside a 16-column block
    with pytest.raises(ValueError, match="blocks of 16"):
        decode_linear(qkv["x"], qkv["W"], bounds=bounds, chain_in=(*qkv["lora"][1:], 0, 0))
