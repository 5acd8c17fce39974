"""The training loop: a plain loop on top of accelerate, shared by every strategy.

All strategies draw the same example stream from one seeded mixture sampler; they differ
only in which adapter each row is routed to (`AdapterPlan`) and, for `multi`, in how task
losses are weighted. A resumed run restores adapters, heads, optimizer, scheduler,
sampler, weighter and RNG state, so it ends exactly where an uninterrupted run would.

Launched on W processes (torchrun, `accelerate launch`), `batch_size` is per process and
the run follows the loss curve of one process with batch W x batch_size (see
`distributed.py`); only rank 0 writes the log, TensorBoard events and checkpoints.

Between log steps the loop never reads the device (no `.item()`, `float(tensor)`,
`.tolist()`), so on a GPU the host queues the next steps while the device works: the
per-task losses stay device tensors, are averaged there, and are read in one batch at a
log step, at the last step and at an early stop. (DWA and GradNorm weighting read each
task's loss every step by design; evaluation steps read their validation losses.)
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tasktune.config import MixingConfig, TrainSettings, WeightingConfig
from tasktune.data.sampler import MixtureSampler
from tasktune.errors import TasktuneError
from tasktune.model.runner import Runner
from tasktune.tasks.spec import Example
from tasktune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tasktune.train import sharded
from tasktune.train.distributed import GlobalLosses, check_weighting, make_accelerator, sync_unless
from tasktune.train.graphed_step import GraphedStep, graphable_adamw
from tasktune.train.schedule import make_scheduler, warmup_steps_from_ratio
from tasktune.train.validation import validation_losses
from tasktune.train.weighting import StaticWeighter, make_weighter


@dataclass
class TrainResult:
    steps: int
    seconds: float
    peak_memory_mb: float
    final_task_loss: dict[str, float]
    best_val_loss: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    processes: int = 1  # data-parallel world size; examples per step = processes x batch_size x grad_accum
    sharded: bool = False  # the model, gradients and optimizer state were sharded over the processes (train.fsdp)


def total_steps(settings: TrainSettings, train_sizes: dict[str, int], world: int = 1) -> int:
    """Optimizer steps of the run; an epoch counts global batches (world x batch_size)."""
    if settings.max_steps:
        return settings.max_steps
    per_step = settings.batch_size * settings.grad_accum * world
    return max(1, math.ceil(settings.epochs * sum(train_sizes.values()) / per_step))


CGC_GATES = ("gate_logits", "gate_proj")  # CGCLoRALinear's gate parameters (lora/cgc.py)


def _optimizer(runner: Runner, settings: TrainSettings, extra_groups: list[dict], graphs: bool = False,
               device: torch.device | None = None) -> torch.optim.Optimizer:
    """device: where training runs (the accelerator's), which the runner's parameters may
    not be on yet (`accelerator.prepare` moves them after): a graph's learning rates live there."""
    named = [(n, p) for n, p in runner.model.named_parameters() if p.requires_grad]
    own_lr = lambda name: settings.gate_lr is not None and name.rsplit(".", 1)[-1] in CGC_GATES  # noqa: E731
    gates = [p for n, p in named if own_lr(n)]
    body = [p for n, p in named if not own_lr(n)]
    lr = settings.full_lr if runner.handle is None else settings.lr
    groups = [{"params": body, "lr": lr, "weight_decay": settings.weight_decay}]
    if gates:  # a router learns at its own rate (no weight decay: it would pull the gate to uniform)
        groups.append({"params": gates, "lr": settings.gate_lr, "weight_decay": 0.0})
    if len(runner.heads):
        groups.append({"params": list(runner.heads.parameters()), "lr": settings.head_lr or settings.lr, "weight_decay": 0.0})
    groups += extra_groups
    # On GPUs the fused AdamW (one kernel per step for all parameters, what HF Trainer's
    # adamw_torch_fused does) instead of the multi-tensor loop; the CPU keeps the default.
    # Decided by where training runs: the parameters may still be on the CPU here.
    fused = (device or runner.device).type == "cuda" or all(p.is_cuda for g in groups for p in g["params"])
    if graphs:  # capturable, learning rates as tensors the scheduler updates in place
        return graphable_adamw(groups, lr, device or runner.device)
    return torch.optim.AdamW(groups, fused=True) if fused else torch.optim.AdamW(groups)


def _graphed_step(runner: Runner, settings: TrainSettings, weighter, optimizer, world: int) -> GraphedStep | None:
    """The CUDA-graphed step when the config asks for it and the run allows it (clear
    errors otherwise); None for the plain loop."""
    if not settings.cuda_graphs:
        return None
    why = [
        reason for reason, bad in (
            ("causal LMs only", runner.family != "causal"),
            ("static loss weights only (the others read losses on the host or differentiate twice)",
             not isinstance(weighter, StaticWeighter)),
            ("grad_accum 1 only", settings.grad_accum != 1),
            ("one process only", world != 1),
        ) if bad
    ]
    if why:
        raise TasktuneError("train.cuda_graphs: " + "; ".join(why))
    weights = dict(zip(weighter.task_names, weighter.weights))
    autocast = torch.bfloat16 if settings.precision == "bf16" else None
    return GraphedStep(runner, getattr(optimizer, "optimizer", optimizer), weights=weights,
                       clip=settings.max_grad_norm or None, autocast=autocast)


def _trainable_state(runner: Runner) -> dict[str, torch.Tensor]:
    if sharded.is_sharded(runner):  # gathered: a collective, the tensors on rank 0
        return sharded.trainable_state(runner)
    return {n: p.detach().clone() for n, p in runner.named_parameters() if p.requires_grad}


def _load_trainable(runner: Runner, tensors: dict[str, torch.Tensor]) -> None:
    if sharded.is_sharded(runner):
        return sharded.load_trainable(runner, tensors)
    params = dict(runner.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def train(
    runner: Runner,
    train_data: dict[str, list[Example]],
    val_data: dict[str, list[Example]],
    settings: TrainSettings,
    mixing: MixingConfig,
    out_dir: Path,
    *,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    task_weights: dict[str, float] | None = None,
) -> TrainResult:
    """Train `runner` in place; writes metrics.jsonl, TensorBoard events and checkpoints
    under out_dir. Returns what the report needs (steps, time, peak memory, losses)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if settings.deterministic or os.environ.get("TASKTUNE_DETERMINISTIC") == "1":
        torch.use_deterministic_algorithms(True)
    accelerator = make_accelerator(settings.precision, runner)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    tasks = [t for t in train_data if train_data[t]]
    sizes = {t: len(train_data[t]) for t in tasks}
    steps = total_steps(settings, sizes, world)
    # Loss weighting is a multi-task device: single-task adapters each see one loss.
    weighting = settings.weighting if runner.plan.strategy != "single" else WeightingConfig(method="static")
    check_weighting(weighting.method, world)
    weighter = make_weighter(
        weighting, tasks, task_weights=task_weights, seed=seed, dwa_window=settings.weighting.dwa_window,
        device=accelerator.device,
    )
    if settings.fsdp:
        sharded.check_fsdp(runner, world)
    fsdp = settings.fsdp and world > 1  # one process: nothing to shard
    if fsdp:  # before the optimizer: it holds the shards
        sharded.shard(runner, runner.repeated_blocks())
    optimizer = _optimizer(runner, settings, weighter.optimizer_param_groups(), graphs=settings.cuda_graphs,
                           device=accelerator.device)
    scheduler = make_scheduler(optimizer, settings.schedule, warmup_steps_from_ratio(settings.warmup_ratio, steps), steps)
    sampler = MixtureSampler(sizes, mixing, seed)
    model, optimizer = (runner, optimizer) if fsdp else accelerator.prepare(runner, optimizer)  # FSDP reduces the gradients
    optimizer_io = sharded.OptimizerState(runner, optimizer) if fsdp else optimizer  # what checkpoints read and write
    graphed = _graphed_step(runner, settings, weighter, optimizer, world)
    start = 0
    best_val, best_state, bad_evals, stopped = math.inf, None, 0, False
    best_task_val: dict[str, float] = {}
    if resume and (ckpt := latest_checkpoint(out_dir / "checkpoints")):
        loaded = load_checkpoint(ckpt, optimizer=optimizer_io, scheduler=scheduler)
        _load_trainable(runner, {k: v for k, v in loaded.tensors.items() if not k.startswith("best/")})
        best = {k.removeprefix("best/"): v for k, v in loaded.tensors.items() if k.startswith("best/")}
        best_state = best or None
        sampler.load_state_dict(loaded.extra["sampler"])
        weighter.load_state_dict(loaded.extra["weighter"])
        early = loaded.extra.get("early", {})
        best_val = early.get("best_val") if early.get("best_val") is not None else math.inf
        bad_evals, best_task_val = early.get("bad_evals", 0), early.get("best_task_val", {})
        start = loaded.step
        if main:
            _truncate_log(out_dir / "metrics.jsonl", start)
    shared = [p for p in runner.model.parameters() if p.requires_grad]
    global_losses = GlobalLosses(accelerator, tasks)
    log = (out_dir / "metrics.jsonl").open("a" if start else "w") if main else None
    writer = _tensorboard(out_dir / "tb") if main else None
    last: dict[str, Tensor] = {}  # each task's latest window mean, on the device
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    bar = tqdm(total=steps, initial=start, desc=f"train {runner.plan.strategy}", disable=not progress or not main)
    runner.train()
    kill_at = int(os.environ.get("TASKTUNE_FAULT_KILL_AT_STEP", "0"))  # crash tests: SIGKILL ourselves
    for step in range(start, steps):
        if kill_at and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        sampler.set_step(step)
        sums: dict[str, Tensor] = {}  # float64 0-d device tensors: never read here
        seen: dict[str, int] = {}  # micro-batches the task was in
        weights: dict[str, float | Tensor] = {}
        for micro in range(settings.grad_accum):
            # Every rank draws the same global batch and keeps its shard: the example
            # stream is the same for any number of processes.
            mine = sampler.draw_shard(settings.batch_size, rank, world)
            batch = runner.collate([train_data[t][i] for t, i in mine], pack=runner.family == "causal")
            if graphed is not None:  # forward, backward, clip and optimizer step in one replay
                losses, means = global_losses(graphed(batch), runner, batch)
                weights = {t: graphed.weights[t] for t in losses}
            else:
                with sync_unless(micro == settings.grad_accum - 1, accelerator, model):
                    with accelerator.autocast():
                        losses = model(batch)
                    losses, means = global_losses(losses, runner, batch)
                    weights = weighter.backward(losses, shared, scale=1.0 / settings.grad_accum)
            for t, mean in means.items():
                sums[t], seen[t] = sums.get(t, 0.0) + mean, seen.get(t, 0) + 1
        if graphed is None:
            if settings.max_grad_norm:
                accelerator.clip_grad_norm_(runner.trainable_parameters(), settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        window = {t: sums[t] / seen[t] for t in sums}  # each task's own mean loss over the micro-batches it was in
        last.update(window)
        bar.update(1)
        if main and ((step + 1) % settings.log_every == 0 or step + 1 == steps):
            task_loss, used = read_values(window, weights)  # the one device read of a log step
            record = {"step": step + 1, "lr": float(scheduler.get_last_lr()[0]), "task_loss": task_loss, "weights": used}
            log.write(json.dumps(record) + "\n")
            log.flush()
            if writer:
                for t, v in task_loss.items():
                    writer.add_scalar(f"loss/{t}", v, step + 1)
                for t, w in used.items():
                    writer.add_scalar(f"weight/{t}", w, step + 1)
            bar.set_postfix({t[:10]: f"{v:.3f}" for t, v in list(task_loss.items())[:4]})
        if settings.eval_every and (step + 1) % settings.eval_every == 0 and val_data:
            val = validation_losses(runner, val_data, settings.val_examples, settings.batch_size)
            sampler.update_losses(val)
            mean_val = sum(val.values()) / max(len(val), 1)
            if main:
                log.write(json.dumps({"step": step + 1, "val_loss": val}) + "\n")
            runner.train()
            if mean_val < best_val:
                best_val, best_task_val, bad_evals = mean_val, val, 0
                if settings.early_stopping_patience:
                    best_state = _trainable_state(runner)
            else:
                bad_evals += 1
                if settings.early_stopping_patience and bad_evals >= settings.early_stopping_patience:
                    stopped = True
                    break
        if settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0 and (main or fsdp):
            tensors = _trainable_state(runner)  # sharded: every rank gathers, rank 0 writes
            if fsdp:
                optimizer_io.gather()
            if main:
                tensors.update({f"best/{k}": v for k, v in (best_state or {}).items()})
                early = {"best_val": best_val if math.isfinite(best_val) else None, "bad_evals": bad_evals, "best_task_val": best_task_val}
                save_checkpoint(
                    out_dir / "checkpoints", step + 1, tensors=tensors, optimizer=optimizer_io, scheduler=scheduler,
                    extra={"sampler": sampler.state_dict(), "weighter": weighter.state_dict(), "early": early},
                )
    (final,) = read_values(last)  # also waits for the queued steps, so the time below is theirs
    bar.close()
    if log:
        log.close()
    if writer:
        writer.close()
    accelerator.wait_for_everyone()
    if best_state is not None:
        _load_trainable(runner, best_state)
    if fsdp:  # the whole weights, for rank 0 to save (Runner.save)
        runner.gathered_weights = sharded.full_weights(runner)
    runner.eval()
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _rss_mb()
    done = step + 1 if steps > start else start
    return TrainResult(done, time.perf_counter() - t0, peak, final, best_task_val, stopped, world, fsdp)


def read_values(*groups: dict[str, float | Tensor]) -> list[dict[str, float]]:
    """Each {name: value} of `groups` with its tensors read as floats, all in one device
    read (one sync) however many there are; floats pass through."""
    tensors = [v.detach().double() for g in groups for v in g.values() if isinstance(v, Tensor)]
    values = iter(torch.stack([t.to(tensors[0].device) for t in tensors]).tolist() if tensors else [])
    return [{k: next(values) if isinstance(v, Tensor) else v for k, v in g.items()} for g in groups]


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log records a killed run wrote after its last checkpoint."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(row + "\n" for row in rows))


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency; stay usable without it
        return None
    return SummaryWriter(str(folder))


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
