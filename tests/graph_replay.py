"""A GPU test helper: a chain of kernel launches captured in a CUDA graph with programmatic
dependent launch (PDL) must equal the same chain run eagerly without it, bit for bit."""

from __future__ import annotations

from typing import Callable

import torch

from tasktune.lora import triton_ops


def assert_graph_with_pdl_equals_eager(chain: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor,
                                       replays: int = 2) -> torch.Tensor:
    """chain(x0) eagerly with PDL off is the reference; then chain is warmed up on a side
    stream, captured (PDL on) and replayed `replays` times, each compared exactly.
    Returns the graph's output."""
    triton_ops.PDL = False
    try:
        want = chain(x0)
    finally:
        triton_ops.PDL = True
    x = x0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x)
    for _ in range(replays):
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    return out
