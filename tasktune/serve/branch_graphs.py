"""Branch scoring (branch_scoring.py) padded to length buckets, and on a GPU replayed from
CUDA graphs.

The eager tree prefill is bound by the host: on an H200, a 64-token prompt and 150 labels
took 42 ms a prediction for ~8 ms of device work (~1,700 launches, each a Python call),
and the running batch waits for it. `BranchStep` stages the prompt and branches padded to
a bucket (tokens, positions, each row's branch, the row that scores each target, the
targets) in static device tensors, builds the tree mask from them on the device, runs
LoRA through the Triton segmented pair (the tree is one sequence, one segment), and
returns every target's log-probability: one replay a prediction. Padding rows sit in the
slot's cache rows past the tree (the slot is freed after), see the prompt and themselves,
and score nothing that is read.

On the CPU (and with `use_graphs=False`) trees run eagerly at their own length
(`branch_scoring.branch_logprobs`); `pad = True` runs the padded layout eagerly (tests).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from tasktune.serve.branch_scoring import branch_logprobs, reads_and_targets, score_rows, split
from tasktune.serve.graph_capture import capture
from tasktune.serve.decoder import Decoder
from tasktune.serve.decoder_lora import LoraStacks
from tasktune.serve.forward_batch import Batch, _rows, tree_mask, tree_rows
from tasktune.serve.kv_cache import KVCache

BUCKETS = (64, 128, 256, 512, 1024, 2048)  # padded tree lengths (prompt + branches)


class BranchStep:
    def __init__(self, model: Decoder, cache: KVCache, lora: LoraStacks | None, *, use_graphs: bool):
        self.model, self.cache, self.lora = model, cache, lora
        device = cache.k.device
        self.use_graphs = use_graphs and device.type == "cuda"
        self.pad = self.use_graphs
        self.top = min(BUCKETS[-1], cache.max_len)
        self.rows = torch.zeros(5, self.top, dtype=torch.long, device=device)  # tokens, positions, branch, reads, targets
        self.seq = torch.zeros(3, dtype=torch.long, device=device)  # slot, adapter, prompt length
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.capture_s: dict[tuple[int, bool], float] = {}

    def bucket(self, n: int) -> int:
        return min(next((b for b in BUCKETS if b >= n), self.top), self.top)

    def takes(self, n: int, use_lora: bool) -> bool:
        """Whether a tree of n rows runs padded: within the buckets, and LoRA (if any) through
        the kernels on a GPU (a graph cannot read the torch path's host-built segments)."""
        kernels = not use_lora or self.lora.kernels or not self.use_graphs
        return self.pad and n <= self.top and kernels

    @torch.no_grad()
    def __call__(self, prompt: list[int], branches: list[list[int]], slot: int, lora_id: int) -> list[list[float]]:
        """Each branch token's log-probability after the prompt (branch_scoring.branch_logprobs)."""
        n = len(prompt) + sum(map(len, branches))
        use_lora = self.lora is not None and lora_id >= 0
        if not self.takes(n, use_lora):
            return branch_logprobs(self.model, self.cache, self.lora, prompt, branches, slot, lora_id)
        T = self.bucket(n)
        self._stage(prompt, branches, slot, lora_id, T)
        if not self.use_graphs:
            out = self._step(T, use_lora)
        else:
            if (T, use_lora) not in self.graphs:
                self._capture(T, use_lora)
            graph, out = self.graphs[(T, use_lora)]
            graph.replay()
        return split(out[:n - len(prompt)].tolist(), branches)

    def _stage(self, prompt: list[int], branches: list[list[int]], slot: int, lora_id: int, T: int) -> None:
        tokens, positions, owner = tree_rows(prompt, branches)
        reads, targets = reads_and_targets(len(prompt), branches)
        fill = T - len(tokens)  # padding: token 0 at position 0, each row a branch of its own
        rows = [tokens + [0] * fill, positions + [0] * fill,
                owner + list(range(len(branches), len(branches) + fill)),
                reads + [0] * (T - len(reads)), targets + [0] * (T - len(targets))]
        self.rows[:, :T].copy_(torch.tensor(rows, dtype=torch.long), non_blocking=True)
        self.seq.copy_(torch.tensor([slot, lora_id, len(prompt)], dtype=torch.long), non_blocking=True)

    def _step(self, T: int, use_lora: bool) -> torch.Tensor:
        """The padded tree's forward from the static inputs -> [T] log-probabilities (the
        first len(targets) real)."""
        r, slot, adapter = self.rows[:, :T], self.seq[0:1], self.seq[1:2]
        rows = _rows(T, r.device)
        batch = Batch(tokens=r[0], positions=r[1], lora_ids=adapter.repeat(T), token_slots=slot.repeat(T), slots=slot,
                      pad_index=rows, valid=rows, mask=tree_mask(r[2], self.seq[2]), last=None, use_lora=use_lora,
                      shape=(1, T, T), bgmv=self.use_graphs, seg_ids=adapter if self.use_graphs else None,
                      cache_positions=rows)
        hidden = self.model(batch, self.cache, self.lora, head=False)
        return score_rows(self.model, hidden, r[3], r[4])

    def _capture(self, T: int, use_lora: bool) -> None:
        t0 = time.perf_counter()
        graph, out = capture(lambda: self._step(T, use_lora), self._pool)
        self._pool = graph.pool()
        self.graphs[(T, use_lora)] = (graph, out)
        self.capture_s[(T, use_lora)] = time.perf_counter() - t0

    def shapes(self) -> list[tuple[int, bool]]:
        """Every (bucket, with adapters) shape a replay takes (none on the CPU)."""
        if not self.use_graphs:
            return []
        kinds = (False, True) if self.lora is not None and self.lora.kernels else (False,)
        return [(T, k) for T in sorted({self.bucket(b) for b in BUCKETS}) for k in kinds]

    def warmup(self, tick: Callable[[], object] = lambda: None) -> int:
        """Capture every shape of `shapes` (tick() after each) into one free KV slot, which
        the captures' warm-up runs write (the caller holds the engine's step lock)."""
        if not self.use_graphs or self.cache.free_slots == 0:
            return 0
        slot = self.cache.alloc()
        try:
            for T, use_lora in self.shapes():
                if (T, use_lora) not in self.graphs:
                    self._stage([0], [[0]], slot, 0 if use_lora else -1, T)
                    self._capture(T, use_lora)
                tick()
        finally:
            self.cache.free(slot)
        return len(self.graphs)
