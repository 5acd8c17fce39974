"""Prefills padded to length buckets, and on a GPU replayed from CUDA graphs.

An eager prefill is bound by the host: on an H200 one 256-token request took 21.6 ms a
step without an adapter and 46.5 ms with one (session 14, serve bench's staggered case),
for well under a millisecond of device work: ~40 operations a layer, ~11 more per adapted
module, each a Python call and a launch. In served traffic most prefills are one arrival
each, taking a slot that a finished request freed, and the running batch waits for it;
a burst of arrivals prefills many at once. `PrefillStep` runs them as graph replays of 1,
2, 4 or 8 prompts (at most MAX_TOKENS padded rows): each prompt padded to the bucket of
its group's longest (rows past its length are padding that writes keys into the
sequence's own slot past its length, which its decode steps rewrite before reading),
every row's adapter id and slot and every sequence's last row in static device tensors,
LoRA through the Triton segmented pair (each sequence one segment: its adapter read once
a tile of rows, lora/triton_sgmv.py), the last real rows' logits out.

On the CPU (and with `use_graphs=False`) the same step runs eagerly with the torch LoRA
path, one prompt at a time and at its own length (`pad`); the CPU tests pad it to run the
layout the graphs capture.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import torch

from tasktune.lora.ops import segment_plan
from tasktune.serve.graph_capture import capture
from tasktune.serve.decoder import Decoder
from tasktune.serve.decoder_lora import LoraStacks
from tasktune.serve.forward_batch import prefill_batch
from tasktune.serve.kv_cache import KVCache

BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)  # padded prompt lengths (up to MAX_TOKENS: one prompt a replay)
MAX_SEQS = 8  # sequences one replay takes (graphs of 1, 2, 4 ... of them)
MAX_TOKENS = 2048  # ... and padded rows (sequences x bucket) one replay takes


class PrefillStep:
    def __init__(self, model: Decoder, cache: KVCache, lora: LoraStacks | None, *, use_graphs: bool):
        self.model, self.cache, self.lora = model, cache, lora
        device = cache.k.device
        self.use_graphs = use_graphs and device.type == "cuda"
        self.bgmv = self.use_graphs  # LoRA through the Triton kernels (what a graph needs), else the torch paths
        self.top = min(BUCKETS[-1], cache.max_len)
        self.max_seqs = MAX_SEQS if self.use_graphs else 1  # (eager, a ragged batch of several costs the host less)
        # prompts padded to their bucket, as a graph needs; eagerly (the CPU) each runs at its own
        # length: padding is compute there (a 257-token prompt of a 6-layer, 512-wide model:
        # 186 ms padded to 512, 87 at its length), while this step costs the host less than the
        # ragged prefill (CPU load test, one VM, one hour: 150 requests/s, 141 with prompts
        # padded, 131 with every prefill ragged). The CPU tests pad, to run the graphs' layout.
        self.pad = self.use_graphs
        rows = max(self.top, MAX_TOKENS)  # the most one replay takes (`sizes`)
        self.rows = torch.zeros(3, rows, dtype=torch.long, device=device)  # tokens, adapter ids, slots
        self.seqs = torch.zeros(3, MAX_SEQS, dtype=torch.long, device=device)  # last rows, adapter ids, slots
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # ... the same steps giving every row's hidden state (prompt scoring), captured on first use
        self.hidden_graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.capture_s: dict[tuple[int, int, bool], float] = {}  # seconds each graph's capture took

    def reset(self) -> None:
        """Drop every graph and their memory pool (the next use captures anew: after a
        change to what the step runs)."""
        self.graphs.clear()
        self.hidden_graphs.clear()
        self._pool = None

    def bucket(self, n: int) -> int:
        """The padded length of an n-token prompt (n <= self.top; n itself when not padding)."""
        return min(next(b for b in BUCKETS if b >= n), self.top) if self.pad else n

    def sizes(self, T: int) -> list[int]:
        """How many sequences of bucket T one replay may take: powers of two, largest first
        (one at least, whatever max_seqs)."""
        out, n = [1], 2
        while n <= self.max_seqs and n * T <= MAX_TOKENS:
            out.insert(0, n)
            n *= 2
        return out

    def takes(self, lengths: list[int]) -> bool:
        """Whether prompts of these lengths prefill here: each within the buckets, on a GPU
        LoRA through the kernels (a graph cannot read the torch path's host-built segments),
        and with max_seqs 1 (the CPU) one prompt (several are cheaper for the host as one
        ragged batch)."""
        kernels_or_none = self.lora is None or self.lora.kernels or not self.use_graphs
        most = len(lengths) if self.max_seqs > 1 else 1
        return kernels_or_none and 0 < len(lengths) <= most and max(lengths) <= self.top

    def groups(self, lengths: list[int]) -> list[list[int]]:
        """The prompts (indices) of each replay: longest first, as many as a captured shape
        holds, padded to the bucket of the group's longest."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        out = []
        while order:
            n = next(n for n in self.sizes(self.bucket(lengths[order[0]])) if n <= len(order))
            out.append(order[:n])
            order = order[n:]
        return out

    def __call__(self, prompts: list[list[int]], slots: list[int], lora_ids: list[int]) -> torch.Tensor:
        """Prefill prompts[i] into KV slots[i] from position 0 under adapter lora_ids[i] (-1:
        none) -> each one's last token's logits [len(prompts), vocab] float32 (copies: the
        next replay reuses the graph's output)."""
        parts, where = [], []
        for group, out, _ in self._groups_run(prompts, slots, lora_ids, hidden=False):
            parts.append(out)
            where += group
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        return logits if where == sorted(where) else logits[torch.tensor(where).argsort().to(logits.device)]

    def hidden(self, prompts: list[list[int]], slots: list[int], lora_ids: list[int]) -> list[torch.Tensor]:
        """The same prefill -> every prompt's rows out of the last layer (before the final
        norm), [len(prompts[i]), hidden] each: what prompt scoring runs the LM head over.
        Its graphs are captured on first use (a scoring workload's shapes only)."""
        rows: list[torch.Tensor | None] = [None] * len(prompts)
        for group, out, T in self._groups_run(prompts, slots, lora_ids, hidden=True):
            for j, i in enumerate(group):
                rows[i] = out[j * T:j * T + len(prompts[i])]
        return rows

    def _groups_run(self, prompts, slots, lora_ids, hidden: bool):
        """Each replay's (prompt indices, output, bucket)."""
        for group in self.groups([len(p) for p in prompts]):
            T = self.bucket(len(prompts[group[0]]))
            ids = [lora_ids[i] for i in group]
            self._stage([prompts[i] for i in group], [slots[i] for i in group], ids, T)
            use_lora = self.lora is not None and max(ids) >= 0
            yield group, self._run(len(group), T, use_lora, ids, hidden), T

    def _run(self, n: int, T: int, use_lora: bool, ids: list[int], hidden: bool = False) -> torch.Tensor:
        if not self.use_graphs:
            return self._step(n, T, use_lora, self._plan(ids, T) if use_lora else None, hidden)
        key, graphs = (n, T, use_lora), self.hidden_graphs if hidden else self.graphs
        if key not in graphs:
            graphs[key] = self._capture(*key, hidden=hidden)
        graph, out = graphs[key]
        graph.replay()
        return out.clone()

    def _plan(self, ids: list[int], T: int):
        """The torch LoRA path's segments (eager steps): each adapter's rows, from host ids."""
        return segment_plan(torch.tensor([a for a in ids for _ in range(T)]), self.rows.device)

    def _stage(self, prompts: list[list[int]], slots: list[int], lora_ids: list[int], T: int) -> None:
        """The static inputs of a step of len(prompts) sequences of T rows: the prompts padded
        with token 0, every row's adapter and slot; each sequence's last row, adapter, slot."""
        rows = [sum((p + [0] * (T - len(p)) for p in prompts), []),
                [a for a in lora_ids for _ in range(T)], [s for s in slots for _ in range(T)]]
        n = len(prompts)
        self.rows[:, :n * T].copy_(torch.tensor(rows, dtype=torch.long), non_blocking=True)
        seqs = [[i * T + len(p) - 1 for i, p in enumerate(prompts)], lora_ids, slots]
        self.seqs[:, :n].copy_(torch.tensor(seqs, dtype=torch.long), non_blocking=True)

    def _step(self, n: int, T: int, use_lora: bool, plan=None, hidden: bool = False) -> torch.Tensor:
        r, s = self.rows[:, :n * T], self.seqs[:, :n]
        batch = prefill_batch(r[0], r[1], r[2], s[0], s[1], s[2], use_lora, plan, bgmv=self.bgmv)
        if hidden:  # every row, no head
            return self.model(replace(batch, last=None), self.cache, self.lora, head=False)
        return self.model(batch, self.cache, self.lora)

    def _capture(self, n: int, T: int, use_lora: bool, hidden: bool = False):
        t0 = time.perf_counter()  # (warm-ups write only staged slots)
        graph, out = capture(lambda: self._step(n, T, use_lora, hidden=hidden), self._pool)
        self._pool = graph.pool()
        if not hidden:
            self.capture_s[(n, T, use_lora)] = time.perf_counter() - t0
        return graph, out

    def shapes(self) -> list[tuple[int, int, bool]]:
        """Every (sequences, bucket, with adapters) shape a replay takes (none on the CPU)."""
        if not self.use_graphs:
            return []
        lora = (False, True) if self.lora is not None else (False,)
        return [(n, T, use_lora) for T in [b for b in BUCKETS if b < self.top] + [self.top]  # every `bucket` value
                for n in self.sizes(T) for use_lora in lora]

    def warmup(self, tick: Callable[[], object] = lambda: None) -> int:
        """Capture every shape of `shapes` (tick() after each), writing padding into one free
        KV slot (the caller holds the engine's step lock). Returns the number of graphs."""
        if not self.use_graphs or self.cache.free_slots == 0:
            return 0
        slot = self.cache.alloc()
        try:
            for n, T, use_lora in self.shapes():
                if (n, T, use_lora) not in self.graphs:
                    self._stage([[0]] * n, [slot] * n, [-1] * n, T)
                    self.graphs[(n, T, use_lora)] = self._capture(n, T, use_lora)
                tick()
        finally:
            self.cache.free(slot)
        return len(self.graphs)
