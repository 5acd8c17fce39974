"""The decode step's Inductor pass (tasktune/serve/compile_passes.py): residual adds come
out of addmm, bias adds stay in; the compiled step still decodes the eager step's tokens."""

from __future__ import annotations

import shutil

import pytest
import torch

from tasktune.serve.compile_passes import UnfuseResidualAddmm
from tasktune.serve.engine import Engine, Request
from tasktune.serve.sampling import SamplingParams

aten = torch.ops.aten


def test_residual_addmm_is_split_and_bias_addmm_kept():
    g = torch.fx.Graph()
    x, a, w, bias = (g.placeholder(name) for name in ("x", "a", "w", "bias"))
    gen = torch.Generator().manual_seed(0)
    values = {x: torch.randn(4, 6, generator=gen), a: torch.randn(4, 5, generator=gen),
              w: torch.randn(5, 6, generator=gen), bias: torch.randn(6, generator=gen)}
    for node, value in values.items():
        node.meta["val"] = value
    residual = g.call_function(aten.addmm.default, (x, a, w))
    biased = g.call_function(aten.addmm.default, (bias, a, w))
    scaled = g.call_function(aten.addmm.default, (x, a, w), {"beta": 2})
    for node in (residual, biased, scaled):
        node.meta["val"] = torch.empty(4, 6)
    g.output((residual, biased, scaled))
    UnfuseResidualAddmm()(g)
    calls = [n.target for n in g.nodes if n.op == "call_function"]
    assert calls.count(aten.addmm.default) == 2 and calls.count(aten.mm.default) == 1  # bias and beta=2 kept
    assert aten.add.Tensor in calls
    out = torch.fx.GraphModule({}, g)(*values.values())
    X, A, W, bias_ = values.values()
    torch.testing.assert_close(out[0], X + A @ W)
    torch.testing.assert_close(out[1], bias_ + A @ W)
    torch.testing.assert_close(out[2], 2 * X + A @ W)
    assert UnfuseResidualAddmm().uuid()  # Inductor's cache key needs one


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="Inductor on the CPU needs a C compiler")
def test_inductor_compiled_decode_matches_eager(tiny_llama):
    def tokens(compile_: bool) -> list[list[int]]:
        eng = Engine.from_pretrained(tiny_llama, max_running=4, max_len=64)
        if compile_:
            torch._dynamo.reset()
            eng.model.compile_decode()  # Inductor, with the pass
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
        seqs = [eng.submit(Request(p, None, SamplingParams(max_tokens=6, ignore_eos=True))) for p in prompts]
        while eng.has_work:
            eng.step()
        return [s.output_ids for s in seqs]

    assert tokens(True) == tokens(False)
