"""Data parallelism: W processes that train exactly like one process with a W-times batch.

The contract (what users of torchrun / `accelerate launch` expect): `train.batch_size` is
per process, so with W processes one micro-batch is a global batch of W x batch_size
examples, and W processes x batch b follow the loss curve of 1 process x batch W*b up to
float round-off. Three pieces make that true:

* Sampling (`MixtureSampler.draw_shard`): every rank runs the same seeded sampler, draws
  the whole global batch and keeps its shard. The example stream does not depend on W,
  the sampler state is the same on every rank, and one checkpoint (rank 0's) resumes all.
* Gradients: accelerate wraps the runner (adapters and heads) in DDP, which averages
  gradients over ranks.
* Loss normalisation (`GlobalLosses`): the runner divides each task's loss by the units
  (target tokens, or labelled rows) of the batch it sees. An average of per-rank means is
  the global mean only when every rank holds the same number of units, which packed
  causal batches and token-level tasks do not. `GlobalLosses` all-reduces every task's
  loss sum and units, then rescales each rank's losses so that the DDP average is exactly
  the gradient of the global-batch loss. The values the weighter and the log see are the
  global losses, identical on every rank, so weighting decisions (uncertainty, DWA) and
  early stopping agree across ranks as well.

Not covered: PCGrad and GradNorm need each task's gradient over the global batch (K
all-reduces of the shared gradients per step); they are refused with W > 1. Sharded
training is tasktune's own (`train.fsdp`, strategy `full`: sharded.py); accelerate's FSDP
and DeepSpeed launches are refused. Dropout masks are drawn per rank (all ranks share the seed), so with
dropout > 0 the curves match in distribution only, and a resumed run restores rank 0's
RNG state on every rank.

Launching: `torchrun --nproc_per_node W -m tasktune.cli train ...`, or `accelerate launch
--multi_gpu --num_processes W -m tasktune.cli ...` (on a CPU-only machine too: gloo).
`accelerate launch --cpu --num_processes W` starts ONE process (accelerate's multi-CPU
launch needs mpirun).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from torch import Tensor

from tasktune.errors import TasktuneError
from tasktune.model.batches import IGNORE, Batch, causal_targets
from tasktune.model.runner import Runner

# Weightings whose combination of task losses is not a function of the task losses alone.
PER_TASK_GRADIENT_METHODS = ("pcgrad", "gradnorm")


def make_accelerator(precision: str, runner: Runner) -> Accelerator:
    """The Accelerator for one training run; distributed when launched by torchrun or
    `accelerate launch`. On a machine without GPUs accelerate only goes distributed when
    told `cpu=True` (otherwise every torchrun worker silently trains alone), so say so.
    DDP must look for unused parameters when a rank's shard can miss a task that owns
    parameters (its own adapter or head); that costs a graph walk per step, so only then."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    task_owned = len(runner.heads) > 0 or len(runner.plan.adapters) > 1
    accelerator = Accelerator(
        cpu=world > 1 and not torch.accelerator.is_available(),
        mixed_precision="bf16" if precision == "bf16" else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=task_owned)],
    )
    kind = accelerator.distributed_type
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_asked or (kind != DistributedType.NO and not kind.value.startswith("MULTI_")):
        raise TasktuneError(
            f"this launch asks accelerate for {'FSDP' if fsdp_asked else kind.value}; tasktune shards itself. "
            "Launch with torchrun or `accelerate launch --multi_gpu` (data-parallel, DDP), and for strategy `full` "
            "set `train: {fsdp: true}` to shard the model, gradients and optimizer state (FSDP2)."
        )
    return accelerator


def is_main_process() -> bool:
    """True on rank 0, and in a process that is not part of a distributed run."""
    rank = os.environ.get("RANK")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return rank is None or rank == "0"


def wait_for_everyone() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_weighting(method: str, world: int) -> None:
    if world > 1 and method in PER_TASK_GRADIENT_METHODS:
        raise TasktuneError(
            f"loss weighting '{method}' needs each task's gradient over the global batch, which "
            f"multi-process training does not compute; use static, uncertainty or dwa, or train on one process"
        )


def sync_unless(last: bool, accelerator: Accelerator, model):
    """Skip the gradient reduction on every micro-batch but the last of a step: DDP's
    all-reduce, or a sharded runner's reduce-scatter (FSDP2, train/sharded.py)."""
    sharded = getattr(model, "model", None)
    if hasattr(sharded, "set_requires_gradient_sync"):
        sharded.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last else accelerator.no_sync(model)


def task_units(runner: Runner, batch: Batch) -> dict[str, tuple[int, int]]:
    """{task: (units, weight)} for this host batch, mirroring `Runner.task_losses`: a task's
    loss there is share * (sum of its losses / max(units, 1)) with share = weight / sum of
    weights. Causal: units = weight = the task's scored tokens (the collate's host counts,
    `batch.targets`). Encoder: weight = the task's rows; units = its labelled rows (sequence
    tasks) or labelled tokens (tagging). Tasks with weight 0 are absent from the runner's
    losses and from this dict. Host work only: `batch` is the batch as collated."""
    if runner.family == "causal":
        targets = batch.targets if batch.targets is not None else causal_targets(batch)
        return {n: (c, c) for n, c in zip(targets.names, targets.counts) if c}
    out: dict[str, tuple[int, int]] = {}
    for name in dict.fromkeys(batch.row_tasks):
        rows = torch.tensor([i for i, t in enumerate(batch.row_tasks) if t == name])
        gold = batch.tok_labels if runner.heads[name].spec.kind == "token" else batch.seq_labels
        out[name] = (int((gold[rows] != IGNORE).sum()), len(rows))
    return out


class GlobalLosses:
    """Turns one rank's per-task losses into the global batch's (see the module docstring).

    `__call__(losses, runner, batch)` returns (losses for the weighter, each task's own mean
    loss over the global batch as a float64 0-d tensor). With one process both are what
    they always were: the runner's losses and loss / share. With W > 1, every task present
    anywhere in the global batch gets a loss whose value is its global loss L_t (the same on
    every rank) and whose gradient, averaged over ranks by DDP, is the gradient of L_t; a
    task absent from this rank's shard gets the constant L_t (no gradient here, but the
    weighter sees it, as a single process would).

    Nothing here waits for the device. Which tasks the global batch holds, and their units,
    are host counts: they are summed over ranks on the host (a gloo all-reduce of a [K, 2]
    CPU tensor, beside NCCL on GPUs). Only the loss sums are all-reduced on the device, and
    the results stay there until the loop logs them.
    """

    def __init__(self, accelerator: Accelerator, tasks: list[str]):
        self.accelerator = accelerator
        self.tasks = list(tasks)
        self.world = accelerator.num_processes
        self.host_group = _host_group() if self.world > 1 else None

    def __call__(self, losses: dict[str, Tensor], runner: Runner, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        shares = runner.last_shares
        if self.world == 1:
            return losses, {t: l.detach().double() / max(shares.get(t, 1.0), 1e-12) for t, l in losses.items()}
        units = task_units(runner, batch)
        total = sum(w for _, w in units.values()) or 1
        if set(units) != set(losses) or any(abs(shares[t] - w / total) > 1e-6 for t, (_, w) in units.items()):
            raise RuntimeError(  # a cheap guard against Runner.task_losses and task_units drifting apart
                f"task_units {units} does not match the runner's losses {sorted(losses)} and shares {shares}: update task_units"
            )
        # counts[k] = (units c, weight a) of task k, summed over ranks on the host: [K, 2] int64
        counts = torch.tensor([units.get(t, (0, 0)) for t in self.tasks], dtype=torch.int64)
        torch.distributed.all_reduce(counts, group=self.host_group)
        counts = counts.tolist()
        # sums[k] = task k's loss sum S over the global batch: [K] float64, summed on the device
        zero = torch.zeros((), dtype=torch.float64, device=self.accelerator.device)
        local = [losses[t].detach().double() / shares[t] * max(units[t][0], 1) if t in units else zero for t in self.tasks]
        sums = self.accelerator.reduce(torch.stack(local), reduction="sum")
        total_global = max(sum(a for _, a in counts), 1)
        out: dict[str, Tensor] = {}
        means: dict[str, Tensor] = {}
        for k, (t, (c, a)) in enumerate(zip(self.tasks, counts)):
            if a == 0:
                continue
            means[t] = sums[k] / max(c, 1)
            value = (a / total_global * means[t]).float()  # L_t: the task's term of the global batch-mean loss
            if t in losses:
                # DDP averages over W ranks: scale so the average of the W gradients is grad L_t.
                scale = self.world * a / total_global / max(c, 1) * max(units[t][0], 1) / shares[t]
                scaled = losses[t] * scale
                out[t] = scaled + (value.to(scaled.dtype) - scaled).detach()
            else:
                out[t] = value
        return out, means


def _host_group():
    """The process group for host-side sums: the default one when it runs gloo (CPU
    training), else a gloo group beside NCCL. Every rank must call this, in the same order."""
    if "gloo" in torch.distributed.get_backend():
        return None
    return torch.distributed.new_group(backend="gloo")
