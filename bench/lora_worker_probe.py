"""Where the LoRA worker chain stops (bench/lora_worker.py; GPU only): 2 layers, 4 adapters, 8
worker programs; a run with the counters full (loads every kernel), the worker alone, then the chain with the linears not waiting and waiting,
then one CUDA graph of the waiting chain, each followed by a look at its counters (ready / meet / done per linear, read on a stream of
their own 2 s after the launch, so a hung chain still shows how far it got) before the sync.

    PYTHONPATH=. timeout 150 python3 bench/lora_worker_probe.py
"""
import sys
import time

import torch

sys.path.insert(0, "bench")
sys.path.insert(0, ".")
from lora_worker import WorkerChain  # noqa: E402

dev, dt = torch.device("cuda"), torch.bfloat16
D, Q, KV, I, r, slots, L, M = 896, 896, 128, 4864, 16, 8, 2, 32
g = torch.Generator().manual_seed(0)
rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dt).to(dev)  # noqa: E731
shapes = {"qkv": (Q + 2 * KV, D, 3), "o": (D, Q, 1), "gate_up": (2 * I, D, 2), "down": (D, I, 1)}
W = [{n: rnd(rows, k, scale=k ** -0.5) for n, (rows, k, _) in shapes.items()} for _ in range(L)]
bias = [rnd(Q + 2 * KV) for _ in range(L)]
norms = [(rnd(D).abs() + 0.5, rnd(D).abs() + 0.5) for _ in range(L)]
AB = [{n: (rnd(slots, m * r, k, scale=k ** -0.5), rnd(slots, rows, r, scale=0.1)) for n, (rows, k, m) in shapes.items()}
      for _ in range(L)]
scaling = torch.full((slots,), 2.0, device=dev)
ids = torch.arange(M, device=dev) % 4
wc = WorkerChain(rnd(M, D), L, D, Q, KV, I, r, AB, scaling, norms, programs=8)
print(wc.n_blocks, flush=True)
peek = torch.cuda.Stream()
def show(tag):
    time.sleep(2)
    with torch.cuda.stream(peek):
        host = wc.cnt.to("cpu", non_blocking=True)
    peek.synchronize()
    print(tag, host.view(3, -1).tolist(), flush=True)
t = time.time()
wc.run(W, bias, ids, load=True)
torch.cuda.synchronize()
print("load ok", time.time() - t, flush=True)
t = time.time()
wc.alone(ids)
show("alone")
torch.cuda.synchronize()
print("alone ok", time.time() - t, flush=True)
for wait in (False, True):
    t = time.time()
    wc.run(W, bias, ids, wait=wait)
    show(f"wait={wait}")
    torch.cuda.synchronize()
    print(f"wait={wait} ok", time.time() - t, flush=True)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    wc.run(W, bias, ids)
for i in range(3):
    t = time.time()
    graph.replay()
    if i == 0:
        show("graph")
    torch.cuda.synchronize()
    print("graph ok", time.time() - t, flush=True)
