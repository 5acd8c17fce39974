"""A graph pass for the compiled decode step: residual adds stay out of cuBLAS.

Inductor rewrites `x + mm(a, b)` into `addmm(x, a, b)` when the sum also feeds a
reduction (in a decoder block: the next RMSNorm). With a full [N, d] matrix as x, cuBLASLt
first copies x into the output (a `memcpy32_post` kernel, two a layer in the H200
profile of bench/serve_bench.py) and then runs a beta=1 GEMM. Split back into mm + add,
the add fuses into the RMSNorm kernel that reads the sum anyway: one launch less per
residual. Bias adds (a 1-D input) keep their fused epilogue.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten = torch.ops.aten


class UnfuseResidualAddmm(CustomGraphPass):
    """Inductor's `post_grad_custom_post_pass`: addmm(x, a, b) with a 2-D x -> x + mm(a, b)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not aten.addmm.default:
                continue
            inp, mat1, mat2 = node.args[:3]
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            val = inp.meta.get("val") if isinstance(inp, torch.fx.Node) else None
            if not isinstance(val, torch.Tensor) or val.dim() != 2:
                continue
            with graph.inserting_before(node):
                mm = graph.call_function(aten.mm.default, (mat1, mat2))
                add = graph.call_function(aten.add.Tensor, (inp, mm))
            mm.meta.update(node.meta)  # same shape and dtype as the addmm's output
            add.meta.update(node.meta)
            node.replace_all_uses_with(add)
            graph.erase_node(node)

    def uuid(self):
        return get_hash_for_files((__file__,))
