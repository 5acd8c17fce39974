"""The decode step, bucketed, and on a GPU replayed from CUDA graphs (gpt-fast, vLLM).

A decode step in the decode layout (`Decoder.decode`) has the shape (B, L, use_lora):
rows = KV slots 0..B-1, L cached positions attended. B is rounded up to a batch bucket
and L to a multiple of `CONTEXT_STEP`, so a handful of graphs cover every step. Replaying
one costs the host a copy of three small integer rows and one launch, instead of the
~1,200 kernel launches of an eager step that kept the GPU idle most of the time.

Inputs live in one static device tensor [3, slots] (tokens, positions, adapter ids);
rows of free slots are padding: token 0, position max_len - 1 (never read), no adapter.
Capturing runs the step twice on a side stream first; the step writes the KV cache,
which is harmless because it writes the same values the replay writes again.
On the CPU (and with `use_graphs=False`) the same bucketed step runs eagerly, so the CPU
tests exercise exactly the code the graphs capture.
"""

from __future__ import annotations

import torch

from tasktune.serve.decoder import Decoder, LoraStacks
from tasktune.serve.kv_cache import KVCache

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
CONTEXT_STEP = 128


def batch_bucket(rows: int, limit: int) -> int:
    """The smallest bucket >= rows, never above limit (the number of KV slots)."""
    return min(next((b for b in BATCH_BUCKETS if b >= rows), limit), limit)


def context_bucket(needed: int, max_len: int) -> int:
    """needed positions rounded up to a multiple of CONTEXT_STEP, capped at max_len."""
    return min(-(-needed // CONTEXT_STEP) * CONTEXT_STEP, max_len)


class DecodeStep:
    def __init__(self, model: Decoder, cache: KVCache, lora: LoraStacks | None, *, use_graphs: bool,
                 compile: bool = False):
        """compile: run each block of the step through torch.compile (`Decoder.compile_decode`:
        a few fused kernels per layer); each bucket is then captured as usual."""
        self.model, self.cache, self.lora = model, cache, lora
        if compile:
            model.compile_decode()
        device = cache.k.device
        self.use_graphs = use_graphs and device.type == "cuda"
        n = cache.num_slots
        self.inputs = torch.zeros(3, n, dtype=torch.long, device=device)  # tokens, positions, adapter ids
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def __call__(self, slots: list[int], tokens: list[int], positions: list[int], lora_ids: list[int]) -> torch.Tensor:
        """One decode step for the sequences in KV `slots` (each fed `tokens[i]` at
        `positions[i]` under adapter `lora_ids[i]`) -> logits [len(slots), vocab] float32,
        in the order given."""
        cache = self.cache
        B = batch_bucket(max(slots) + 1, cache.num_slots)
        L = context_bucket(max(positions) + 1, cache.max_len)
        use_lora = self.lora is not None and any(a >= 0 for a in lora_ids)
        rows = [[0] * B, [cache.max_len - 1] * B, [-1] * B]
        for s, t, p, a in zip(slots, tokens, positions, lora_ids):
            rows[0][s], rows[1][s], rows[2][s] = t, p, a
        self.inputs[:, :B].copy_(torch.tensor(rows, dtype=torch.long), non_blocking=True)
        logits = self._run(B, L, use_lora)
        index = torch.tensor(slots, dtype=torch.long).to(logits.device, non_blocking=True)
        return logits.index_select(0, index)

    def _run(self, B: int, L: int, use_lora: bool) -> torch.Tensor:
        if not self.use_graphs:
            return self._step(B, L, use_lora)
        key = (B, L, use_lora)
        if key not in self.graphs:
            self.graphs[key] = self._capture(B, L, use_lora)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits  # static memory of the graph: read before the next replay

    def _step(self, B: int, L: int, use_lora: bool) -> torch.Tensor:
        tokens, positions, ids = self.inputs[0, :B], self.inputs[1, :B], self.inputs[2, :B]
        return self.model.decode(tokens, positions, ids, L, self.cache, self.lora, use_lora)

    def _capture(self, B: int, L: int, use_lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy inits, rope table, kernel selection
                self._step(B, L, use_lora)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._step(B, L, use_lora)
        self._pool = graph.pool()
        return graph, logits

    def warmup(self, max_rows: int) -> int:
        """Capture every (batch, context) bucket up to max_rows rows, with and without
        adapters, so no request pays for a capture. Returns the number of graphs."""
        if not self.use_graphs:
            return 0
        top = batch_bucket(max_rows, self.cache.num_slots)
        batches = [b for b in BATCH_BUCKETS if b < top] + [top]
        contexts = sorted({context_bucket(n, self.cache.max_len)
                           for n in range(CONTEXT_STEP, self.cache.max_len + CONTEXT_STEP, CONTEXT_STEP)})
        self.inputs[0].zero_()
        self.inputs[1].fill_(self.cache.max_len - 1)  # padding rows only: writes nothing that is read
        self.inputs[2].fill_(-1)
        for B in batches:
            for L in contexts:
                for use_lora in ((False, True) if self.lora is not None else (False,)):
                    if (B, L, use_lora) not in self.graphs:
                        self.graphs[(B, L, use_lora)] = self._capture(B, L, use_lora)
        return len(self.graphs)
