"""Capturing a step as a CUDA graph: shared by the decode, prefill and branch-scoring steps."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def capture(run: Callable[[], T], pool, reset: Callable[[], None] | None = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """run() captured as a CUDA graph in memory pool `pool` (None: a new one) -> (graph, the
    outputs it writes on each replay). Two warm-up runs on a side stream first (lazy inits,
    kernel selection, compilation), each followed by reset() (inputs the run moves on)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
            if reset is not None:
                reset()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = run()
    return graph, outputs
