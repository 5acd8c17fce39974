"""LoRA of a few distinct adapters inside the fused decode linear (`decode_linear(...,
few=)`, triton_lora_few.py): shrink programs beside the GEMM programs, the expand as one
more K step of the last split. Against float64 for each kind of linear the decoder runs,
with and without split K, and the host-side table `few_adapters` against its definition.
"""

from __future__ import annotations

import os

import pytest
import torch

from tasktune.serve import triton_linear
from tasktune.serve.triton_linear import decode_linear, few_adapters, linear_config
from test_triton_linear import make, reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not triton_linear.available(DEVICE),
                                reason="Triton cannot run here (no CUDA, and TRITON_INTERPRET is not 1)")
IDS = [3, 0, -1, 3, 5, 0, 5, 3]  # 3 distinct adapters, repeats, a row without one
FOUR = [2, 2, 1, 4, -1, 0, 4, 1]  # exactly four


def test_few_adapters_table():
    slots, row_u = few_adapters(torch.tensor([5, -1, 2, 5, 7, 2]))
    assert slots.tolist() == [5, 2, 7, -1] and row_u.tolist() == [0, -1, 1, 0, 2, 1]
    assert slots.dtype == row_u.dtype == torch.int32
    with pytest.raises(ValueError, match="5 distinct adapters"):
        few_adapters(torch.tensor([0, 1, 2, 3, 4]))


# name: rows, K, module bounds (on 16-row block edges), kwargs of make
LINEARS = {"qkv": (96, 72, (48, 64), dict(bias=True, norm=True, modules=3)),
           "o": (64, 80, (), dict(residual=True, modules=1)),
           "gate_up": (2 * 80, 72, (80,), dict(norm=True, swiglu=True, modules=2)),
           "down": (48, 300, (), dict(residual=True, modules=1))}


@pytest.mark.parametrize("name", list(LINEARS))
@pytest.mark.parametrize("split_k,batch", [(1, IDS), (3, IDS), (3, FOUR)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_lora_equals_float64(name, split_k, batch, dtype):
    rows, K, bounds, kw = LINEARS[name]
    args = make(len(batch), rows, K, dtype=dtype, seed=5, slots=6, **kw)
    A, B, scaling, _ = args["lora"]
    ids = torch.tensor(batch, device=DEVICE)
    args.update(lora=(A, B, scaling, ids), bounds=bounds)
    N = rows // 2 if args["swiglu"] else rows
    cfg = linear_config(len(batch), N, K, split_k=split_k, block_n=16, block_k=32)
    got = decode_linear(args["x"], args["W"], args["bias"], args["residual"], norm=args["norm"], swiglu=args["swiglu"],
                        lora=args["lora"], bounds=bounds, config=cfg, few=few_adapters(ids))
    want = reference(**args)
    plain = reference(**{**args, "lora": None})
    assert (want - plain).abs().max().item() > 0.05 * want.abs().max().item()  # the LoRA term matters here
    # bf16: h * scaling is rounded to bf16 before the expand, as PEFT's lora_A output is
    tol = (1e-5 if dtype == torch.float32 and INTERPRET else 5e-3 if dtype == torch.float32 else 3e-2)
    assert (got.double() - want).abs().max().item() <= tol * want.abs().max().item()
    assert int(triton_linear._counter_buffer(got.device).abs().sum()) == 0  # left at zero for the next launch


def test_few_rejects_bad_tables_and_unaligned_modules():
    rows, K, bounds, kw = LINEARS["qkv"]
    args = make(len(IDS), rows, K, dtype=torch.float32, seed=5, slots=6, **kw)
    A, B, scaling, _ = args["lora"]
    ids = torch.tensor(IDS, device=DEVICE)
    slots, row_u = few_adapters(ids)
    cfg = linear_config(len(IDS), rows, K, block_n=16)
    call = lambda few, bounds=bounds: decode_linear(  # noqa: E731
        args["x"], args["W"], norm=args["norm"], lora=(A, B, scaling, ids), bounds=bounds, config=cfg, few=few)
    with pytest.raises(ValueError, match="few: slots"):
        call((slots.long(), row_u))
    with pytest.raises(ValueError, match="few: slots"):
        call((slots, row_u[1:]))
    with pytest.raises(ValueError, match="module bounds"):
        call((slots, row_u), bounds=(40, 64))
    with pytest.raises(ValueError, match="few need lora"):
        decode_linear(args["x"], args["W"], few=(slots, row_u))
