"""A training step replayed as one CUDA graph per batch shape.

Short packed rows make a LoRA step host-bound: on an H200 a 32-example DU step of the
0.5B model is ~2,900 kernel launches for 22 ms of device work, and the host needs ~110 ms
to issue them. Captured once per shape, the whole step (forward, loss, backward, clip,
optimizer) is one `graph.replay()`.

What a captured step may not do, and how this file avoids it:
- read the device from the host: the loss is built from device tensors only
  (`Runner.static_losses`: scored positions padded to a bucket, per-task sums by
  `index_add_`, 1 / total as a tensor), and HF always gets a 4-D mask (a 2-D one it
  would inspect; no mask it would treat differently during capture);
- depend on host values that change per batch: the graph key is everything host-side the
  step reads (rows, width, scored-position bucket, mask kind); the per-task split is a
  device index, and tasks absent from a batch add exactly zero;
- allocate outside its pool: inputs are copied into static tensors; gradients are freed
  before capture so the captured backward writes them in the graph's pool;
- read what the eager step before it left behind: the adapter routing's per-forward
  tensors (token ids, column masks) are dropped before capture, or the graph would read
  the warm step's, built from its first batch, on every replay (a replayed step then
  trained on another batch's routing: caught on an H200 by the resume test);
- change hyperparameters behind the graph's back: the optimizer must be capturable
  with tensor learning rates (`graphable_adamw`), which schedulers update in place.

The first batch of each key runs eagerly (it is a real step: compiles, lazy inits),
then its graph is captured (capture runs nothing). Graphs share one memory pool: they
never run concurrently and keep nothing in the pool across replays. Loss weighting must be
linear (static weights); the others read losses on the host or differentiate twice.

On a machine without CUDA (tests) `capture=False` runs the same static-input step
eagerly, so the plumbing and the loss are checked against the plain step on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from tasktune.errors import TasktuneError
from tasktune.model.batches import IGNORE, Batch, causal_targets


@dataclass
class StaticBatch:
    """What a captured step reads, as tensors (host or device); `key` says which graph."""

    input_ids: Tensor  # [B, T]
    position_ids: Tensor | None  # [B, T]; None: 0..T-1 (unpacked rows)
    segment_ids: Tensor  # [B, T] example of each token, -1 = padding
    adapter_ids: Tensor  # [B] or [B, T]
    position: Tensor  # [N_pad] flat index of each scored position (0 for padding)
    labels: Tensor  # [N_pad] (IGNORE for padding)
    task: Tensor  # [N_pad] index into `names` (0 for padding: its loss is exactly 0)
    inv_total: Tensor  # [] 1 / scored positions
    names: tuple[str, ...]  # every task of the runner, in a fixed order
    present: dict[str, float]  # task -> its share of the scored positions (host)

    @property
    def key(self) -> tuple:
        return (
            tuple(self.input_ids.shape), tuple(self.adapter_ids.shape), self.position.shape[0],
            self.position_ids is not None, self.segment_ids is not None, self.names,
        )

    def tensors(self) -> dict[str, Tensor]:
        names = ("input_ids", "position_ids", "segment_ids", "adapter_ids", "position", "labels", "task", "inv_total")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def scored_bucket(n: int, width: int) -> int:
    """Scored positions padded up to a quarter of the batch's B * T tokens (at least 128):
    at most four graphs per batch shape instead of one per count."""
    step = max(128, -(-width // 4 // 128) * 128)
    return max(step, -(-n // step) * step)


def static_batch(batch: Batch, names: tuple[str, ...]) -> StaticBatch:
    """A collated causal batch (on the host) -> the static form of `Runner.static_losses`."""
    if batch.labels is None:
        raise TasktuneError("CUDA-graphed training steps need causal LM batches (encoders are not supported)")
    t = batch.targets if batch.targets is not None else causal_targets(batch)
    unknown = [n for n in t.names if n not in names]
    if unknown:
        raise TasktuneError(f"batch holds task(s) the runner does not know: {', '.join(unknown)}")
    B, T = batch.input_ids.shape
    n = sum(t.counts)
    n_pad = scored_bucket(n, B * T)
    task = torch.repeat_interleave(torch.tensor([names.index(x) for x in t.names], dtype=torch.long), torch.tensor(t.counts))
    pad = n_pad - n
    segment = batch.segment_ids
    if segment is None:  # one example a row, padding apart. Always an explicit mask: without one
        # HF skips the mask for plain causal rows, but not while a graph is being captured
        # (it cannot tell then), and the capture would compile another block variant.
        segment = torch.where(batch.attention_mask.bool(), 0, -1)
    return StaticBatch(
        input_ids=batch.input_ids, position_ids=batch.position_ids, segment_ids=segment, adapter_ids=batch.adapter_ids,
        position=torch.cat([t.position, t.position.new_zeros(pad)]),
        labels=torch.cat([t.labels, t.labels.new_full((pad,), IGNORE)]),
        task=torch.cat([task, task.new_zeros(pad)]),
        inv_total=torch.tensor(1.0 / max(n, 1), dtype=torch.float32),
        names=names, present={x: c / max(n, 1) for x, c in zip(t.names, t.counts) if c},
    )


def graphable_adamw(groups, lr: float, device: torch.device, **kwargs) -> torch.optim.AdamW:
    """AdamW that a CUDA graph can capture: fused, capturable, learning rates as device
    tensors (a captured float would be frozen into the graph; schedulers `fill_` tensors)."""
    groups = [dict(g) for g in groups] if groups and isinstance(groups[0], dict) else [{"params": list(groups)}]
    for g in groups:
        g["lr"] = torch.tensor(float(g.get("lr", lr)), dtype=torch.float32, device=device)
    cuda = torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, lr=torch.tensor(float(lr), device=device), fused=cuda, capturable=cuda, **kwargs)


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph
    inputs: dict[str, Tensor]  # static device tensors the graph reads
    losses: Tensor  # static device tensor [n_tasks] the graph writes


class GraphedStep:
    """`step(batch) -> {task: loss tensor}`: one optimizer step on a causal batch, each
    batch shape captured once as a CUDA graph and replayed after (module docstring).

    weights: task -> static loss weight (default 1 each); clip: max gradient norm or None;
    autocast: the compute dtype (bf16 base + fp32 adapters) or None."""

    def __init__(
        self, runner, optimizer: torch.optim.Optimizer, *, weights: dict[str, float] | None = None,
        clip: float | None = None, autocast: torch.dtype | None = torch.bfloat16, capture: bool | None = None,
        max_graphs: int = 64,
    ):
        if runner.family != "causal":
            raise TasktuneError("CUDA-graphed training steps support causal LMs only")
        self.runner, self.optimizer = runner, optimizer
        self.names = tuple(runner.tasks)
        self.weights = {n: float((weights or {}).get(n, 1.0)) for n in self.names}
        # on the device before any capture (a capture may not copy from pageable host memory)
        self._weights = torch.tensor([self.weights[n] for n in self.names], device=runner.device)
        self.clip, self.autocast = clip, autocast
        self.device = runner.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise TasktuneError("CUDA graphs need a CUDA device")
        if self.capture:
            loose = [i for i, g in enumerate(optimizer.param_groups) if not (g.get("capturable") and isinstance(g["lr"], Tensor))]
            if loose:
                raise TasktuneError(
                    "a CUDA-graphed step needs a capturable optimizer with tensor learning rates "
                    f"(param groups {loose} are not): build it with graphable_adamw"
                )
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.stream = torch.cuda.Stream(self.device) if self.capture else None
        self.captured = self.replayed = self.eager = 0  # counters for benchmarks and logs

    def key(self, batch: Batch) -> tuple:
        return static_batch(batch, self.names).key

    def _body(self, s: dict[str, Tensor], static: StaticBatch) -> Tensor:
        """The step on device tensors: returns the per-task losses [n_tasks] (detached)."""
        amp = torch.autocast(self.device.type, dtype=self.autocast, cache_enabled=False) if self.autocast else nullcontext()
        with amp:
            sums = self.runner.static_losses(s, static)  # [n_tasks]
        (sums * self._weights.to(sums.dtype)).sum().backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.runner.trainable_parameters(), self.clip, foreach=True)
        self.optimizer.step()
        return sums.detach()

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        static = static_batch(batch, self.names)
        self.runner.last_shares = dict(static.present)
        host = static.tensors()
        entry = self.graphs.get(static.key)
        if entry is not None:
            for name, t in host.items():
                entry.inputs[name].copy_(t, non_blocking=True)
            entry.graph.replay()
            self.replayed += 1
            out = entry.losses.clone()
        else:
            inputs = {n: t.to(self.device) for n, t in host.items()}
            if self.capture:
                out = self._warm_and_capture(static, inputs)
            else:
                self.optimizer.zero_grad(set_to_none=True)
                out = self._body(inputs, static)
                self.optimizer.zero_grad(set_to_none=True)
                self.eager += 1
        return {n: out[self.names.index(n)] for n in static.present}

    def _warm_and_capture(self, static: StaticBatch, inputs: dict[str, Tensor]) -> Tensor:
        """The batch's real step, eagerly on a side stream (compiles, lazy inits), then the
        same step captured (not run) for this key's later batches."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.optimizer.zero_grad(set_to_none=True)
            out = self._body(inputs, static).clone()
            self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.eager += 1
        if len(self.graphs) >= self.max_graphs:
            return out  # too many shapes: the rest run eagerly
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                losses = self._body(inputs, static)
        except RuntimeError as e:
            raise TasktuneError(
                f"capturing the training step as a CUDA graph failed ({e}); something in the step reads the "
                "device from the host or allocates on the CPU. Train without cuda_graphs, or compile the blocks."
            ) from e
        self.graphs[static.key] = _Graph(graph, inputs, losses)
        self.captured += 1
        return out
