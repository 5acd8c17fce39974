"""One sequence's prefill, padded to a length bucket, and on a GPU replayed from CUDA graphs.

An eager prefill is bound by the host: on an H200 one 256-token request took 21.6 ms a
step without an adapter and 46.5 ms with one (session 14, serve bench's staggered case),
for well under a millisecond of device work: ~40 operations a layer, ~11 more per adapted
module, each a Python call and a launch. In served traffic most prefills are one arrival
each, taking a slot that a finished request freed, and the running batch waits for it.
`PrefillStep` runs such a prefill as one graph replay: the prompt padded to a bucket of
`BUCKETS` (rows past its length are padding that writes keys into the sequence's own slot
past its length, which its decode steps rewrite before reading), every row's adapter id
and slot in a static device tensor, LoRA through the Triton BGMV pair (device ids; the
torch paths read a plan built on the host), the last real row's logits out.

On the CPU (and with `use_graphs=False`) the same padded step runs eagerly with the torch
LoRA path for a prefill of one sequence, so the CPU tests run the layout the graphs capture.
"""

from __future__ import annotations

import torch

from tasktune.serve.cuda_graphs import capture
from tasktune.serve.decoder import Decoder, LoraStacks
from tasktune.serve.forward_batch import prefill_batch
from tasktune.serve.kv_cache import KVCache

BUCKETS = (32, 64, 128, 256, 512)
MAX_SEQS = 8  # more sequences in one engine step prefill eagerly, as one ragged batch (the CPU: more than 1)


class PrefillStep:
    def __init__(self, model: Decoder, cache: KVCache, lora: LoraStacks | None, *, use_graphs: bool):
        self.model, self.cache, self.lora = model, cache, lora
        device = cache.k.device
        self.use_graphs = use_graphs and device.type == "cuda"
        self.bgmv = self.use_graphs  # LoRA through the BGMV pair (what a graph needs), else the torch paths
        self.top = min(BUCKETS[-1], cache.max_len)
        self.inputs = torch.zeros(3, self.top, dtype=torch.long, device=device)  # tokens, adapter ids, slots
        self.last = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def bucket(self, n: int) -> int:
        """The padded length of an n-token prompt (n <= self.top)."""
        return min(next(b for b in BUCKETS if b >= n), self.top)

    def takes(self, lengths: list[int]) -> bool:
        """Whether prompts of these lengths prefill here, one replay each: few of them, each
        within the buckets, and on a GPU LoRA through the kernels (a graph cannot read the
        torch path's host-built segments)."""
        kernels_or_none = self.lora is None or self.lora.kernels or not self.use_graphs
        most = MAX_SEQS if self.use_graphs else 1  # (eager, a batch of several costs the host less)
        return kernels_or_none and 0 < len(lengths) <= most and max(lengths) <= self.top

    def __call__(self, prompt: list[int], slot: int, lora_id: int) -> torch.Tensor:
        """Prefill `prompt` into KV `slot` from position 0 under adapter `lora_id` (-1: none)
        -> its last token's logits [1, vocab] float32 (a copy: the next replay reuses the
        graph's output)."""
        T = self.bucket(len(prompt))
        self._stage(prompt, slot, lora_id, T)
        use_lora = self.lora is not None and lora_id >= 0
        if not self.use_graphs:
            return self._step(T, use_lora, [(lora_id, None)] if use_lora else [])
        key = (T, use_lora)
        if key not in self.graphs:
            self.graphs[key] = self._capture(T, use_lora)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits.clone()

    def _stage(self, prompt: list[int], slot: int, lora_id: int, T: int) -> None:
        """The static inputs of a T-row step: the prompt padded with token 0, every row's
        adapter and slot, the last real row."""
        n = len(prompt)
        staged = torch.tensor([prompt + [0] * (T - n), [lora_id] * T, [slot] * T], dtype=torch.long)
        self.inputs[:, :T].copy_(staged, non_blocking=True)
        self.last.fill_(n - 1)

    def _step(self, T: int, use_lora: bool, plan=None) -> torch.Tensor:
        batch = prefill_batch(self.inputs[0, :T], self.inputs[1, :T], self.inputs[2, :T], self.last, use_lora, plan,
                              bgmv=self.bgmv)
        return self.model(batch, self.cache, self.lora)

    def _capture(self, T: int, use_lora: bool):
        graph, logits = capture(lambda: self._step(T, use_lora), self._pool)  # (warm-ups write only the slot's own KV)
        self._pool = graph.pool()
        return graph, logits

    def warmup(self) -> int:
        """Capture every bucket, with and without adapters, writing padding into a free KV
        slot (the caller holds the engine's step lock). Returns the number of graphs."""
        if not self.use_graphs or self.cache.free_slots == 0:
            return 0
        slot = self.cache.alloc()
        try:
            for T in [b for b in BUCKETS if b < self.top] + [self.top]:  # every value `bucket` takes
                for use_lora in ((False, True) if self.lora is not None else (False,)):
                    if (T, use_lora) not in self.graphs:
                        self._stage([0], slot, -1, T)
                        self.graphs[(T, use_lora)] = self._capture(T, use_lora)
        finally:
            self.cache.free(slot)
        return len(self.graphs)
