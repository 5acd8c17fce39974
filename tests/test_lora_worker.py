"""The persistent LoRA worker experiment (bench/lora_worker.py) and the decode_linear options it
uses (out=, signal=, wait_delta=).

Under the interpreter a launch's programs run one after another, so the worker runs with one
program and every input counted ready (`WorkerChain.alone`): its deltas against float64 LoRA
on the same activations. Its concurrency with the chain (counters polled across kernels)
only runs on a GPU, in `decode_layers_bench.py --worker`, which checks the chain's output
against eager torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tasktune.serve import triton_linear
from tasktune.serve.triton_linear import decode_linear, linear_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not triton_linear.available(DEVICE),
                                reason="Triton cannot run here (no CUDA, and TRITON_INTERPRET is not 1)")


def test_decode_linear_writes_into_out_and_counts_its_stored_blocks():
    g = torch.Generator().manual_seed(0)
    M, N, K = 5, 96, 64
    x = torch.randn(M, K, generator=g).to(DEVICE)
    W = (torch.randn(N, K, generator=g) * K ** -0.5).to(DEVICE)
    delta = torch.randn(M, N, generator=g).to(DEVICE)
    counters = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    out = torch.full((M, N), float("nan"), device=DEVICE)
    y = decode_linear(x, W, delta=delta, out=out, signal=counters[0:1], wait_delta=(counters[1:2], 0))
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, decode_linear(x, W, delta=delta))
    cfg = linear_config(M, N, K)
    assert counters.tolist() == [-(-N // cfg.BLOCK_N), 0]  # one count a stored N block, the polled one untouched
    with pytest.raises(ValueError, match="out"):
        decode_linear(x, W, out=torch.empty(M, N + 1, device=DEVICE))


def test_worker_deltas_equal_lora_of_each_linear_input():
    from lora_worker import WorkerChain

    g = torch.Generator().manual_seed(1)
    D, Q, KV, I, r, slots, layers, M = 64, 64, 16, 128, 16, 6, 2, 7
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE)  # noqa: E731
    shapes = {"qkv": (Q + 2 * KV, D, 3), "o": (D, Q, 1), "gate_up": (2 * I, D, 2), "down": (D, I, 1)}
    AB = [{n: (rnd(slots, m * r, k, scale=k ** -0.5), rnd(slots, rows, r, scale=0.1))
           for n, (rows, k, m) in shapes.items()} for _ in range(layers)]
    norms = [(rnd(D).abs() + 0.5, rnd(D).abs() + 0.5) for _ in range(layers)]
    scaling = torch.tensor([2.0, 0.5, 1.0, 3.0, 1.5, 0.25], device=DEVICE)
    ids = torch.tensor([3, 0, -1, 3, 5, 0, 1], device=DEVICE)  # 4 distinct adapters and a row without one
    wc = WorkerChain(rnd(M, D), layers, D, Q, KV, I, r, AB, scaling, norms, programs=1)
    for buf in (wc.qkv, wc.mid, wc.act):
        buf.copy_(torch.randn(buf.shape, generator=g))
    wc.alone(ids)

    for i in range(layers):
        inputs = {"qkv": wc.mid[2 * i] * norms[i][0], "o": wc.qkv[i][:, :Q], "gate_up": wc.mid[2 * i + 1] * norms[i][1],
                  "down": wc.act[i]}
        for n, (rows, k, modules) in shapes.items():
            A, B = (t.double() for t in AB[i][n])
            want = torch.zeros(M, rows, dtype=torch.float64)
            edges = {"qkv": [0, Q, Q + KV, Q + 2 * KV], "gate_up": [0, I, 2 * I]}.get(n, [0, rows])
            for m, slot in enumerate(ids.tolist()):
                if slot < 0:
                    continue
                h = A[slot] @ inputs[n][m].double()
                for j in range(modules):
                    cols = slice(edges[j], edges[j + 1])
                    want[m, cols] = scaling[slot].double() * B[slot][cols] @ h[j * r:(j + 1) * r]
            torch.testing.assert_close(wc.d[n][i].double(), want, rtol=1e-4, atol=1e-4, msg=f"layer {i} {n}")
