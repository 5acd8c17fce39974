"""One training run of one strategy, from a config to a run folder.

The run folder is what every later step reads:
    run.json               strategy, tasks, seeds, versions, timings, losses
    config.json            the resolved config
    metrics.jsonl, tb/     per-step losses and weights
    adapters/<name>/       PEFT adapters (adapter_config.json + adapter_model.safetensors)
    heads/<task>.*         encoder heads
    model/                 strategy `full`: the whole model

Launched on several processes (torchrun, `accelerate launch`), every rank trains and
only rank 0 writes the folder.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tasktune.config import ProjectConfig
from tasktune.data.load import load_project
from tasktune.data.validate import check_lengths
from tasktune.errors import DataError, TasktuneError
from tasktune.model.load import LoadedModel, load_model
from tasktune.model.plan import check_strategy, plan_for
from tasktune.model.runner import Runner
from tasktune.tasks.from_config import build_tasks
from tasktune.tasks.spec import Example, Task
from tasktune.train.distributed import is_main_process, wait_for_everyone
from tasktune.train.loop import TrainResult, train


@dataclass
class PreparedData:
    tasks: list[Task]
    train: dict[str, list[Example]]
    validation: dict[str, list[Example]]
    test: dict[str, list[Example]]
    skipped_tasks: dict[str, str]  # task -> why it cannot be trained on this model
    skipped_rows: int


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    import tasktune

    return {
        "tasktune": tasktune.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})",
    }


def prepare_data(cfg: ProjectConfig, family: str, *, skip_invalid: bool = False, tokenizer=None) -> PreparedData:
    """Load every task's splits, check lengths against the model's tokenizer, and drop
    (loudly) tasks the model family cannot train. Bad rows raise a DataError naming
    file, line and field, or with skip_invalid are skipped and counted."""
    tasks, loaded = load_project(cfg, skip_invalid=skip_invalid)
    skipped: dict[str, str] = {}
    if family == "encoder":
        for t in tasks:
            if t.kind == "generation":
                skipped[t.name] = "generation needs a causal LM; the encoder model has no decoder"
        tasks = [t for t in tasks if t.name not in skipped]
    if not tasks:
        raise TasktuneError("no trainable task left for this model: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    n_skipped = sum(len(s.skipped) for t in tasks for s in loaded[t.name].values())
    splits: dict[str, dict[str, list[Example]]] = {"train": {}, "validation": {}, "test": {}}
    issues = []
    for t in tasks:
        for name, part in loaded[t.name].items():
            examples = part.examples
            if tokenizer is not None:
                too_long = check_lengths(examples, t, tokenizer, cfg.max_length, cfg.seed, causal=family == "causal")
                issues += too_long
                bad = {(i.path, i.line) for i in too_long}
                examples = [ex for ex in examples if (ex.origin.path, ex.origin.line) not in bad]
            splits[name][t.name] = examples
    if issues and not skip_invalid:
        raise DataError(issues, hint="raise max_length, shorten these rows, or use --skip-invalid to skip them")
    return PreparedData(tasks, splits["train"], splits["validation"], splits["test"], skipped, n_skipped + len(issues))


def build_runner(cfg: ProjectConfig, loaded: LoadedModel, tasks: list[Task], strategy: str, groups=None) -> Runner:
    plan = plan_for(strategy, [t.name for t in tasks], groups)
    max_length = min(cfg.max_length, loaded.max_length or cfg.max_length)
    return Runner(
        loaded, tasks, plan, cfg.lora, max_length=max_length, seed=cfg.seed, pack_tokens=cfg.train.max_tokens,
        head_dropout=cfg.train.head_dropout,
    )


def train_strategy(
    cfg: ProjectConfig,
    strategy: str,
    out_dir: Path,
    *,
    resume: bool = False,
    skip_invalid: bool = False,
    data: PreparedData | None = None,
    groups: list[list[str]] | None = None,
    progress: bool = True,
) -> tuple[Runner, TrainResult, PreparedData]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    groups = groups or cfg.groups
    check_strategy(strategy)  # config mistakes surface before the weights load
    if data is None:
        build_tasks(cfg)
    loaded = load_model(cfg.model)
    data = data or prepare_data(cfg, loaded.family, skip_invalid=skip_invalid, tokenizer=loaded.tokenizer)
    runner = build_runner(cfg, loaded, data.tasks, strategy, groups)
    if cfg.train.compile:
        runner.compile_blocks()
    started = time.time()
    result = train(
        runner, data.train, data.validation, cfg.train, cfg.mixing, out_dir,
        seed=cfg.seed, resume=resume, progress=progress,
        task_weights={e.task_name: e.weight for e in cfg.tasks if e.task_name in data.train},
    )
    if is_main_process():
        write_run(out_dir, cfg, strategy, loaded, runner, result, data, started, groups)
    wait_for_everyone()  # no rank reads the run folder before rank 0 has written it
    return runner, result, data


def write_run(
    out_dir: Path, cfg: ProjectConfig, strategy: str, loaded: LoadedModel, runner: Runner, result: TrainResult,
    data: PreparedData, started: float, groups: list[list[str]] | None,
) -> None:
    """Adapters (or the model), heads, config.json and run.json: what later steps read."""
    runner.save(out_dir)
    (out_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    record = {
        "strategy": strategy,
        "model": cfg.model,
        "model_path": loaded.path,
        "family": loaded.family,
        "tasks": [t.name for t in data.tasks],
        "task_adapter": runner.plan.task_adapter,
        "labels": {t.name: list(t.labels) if t.labels else None for t in data.tasks},
        "skipped_tasks": data.skipped_tasks,
        "skipped_rows": data.skipped_rows,
        "train_examples": {t: len(v) for t, v in data.train.items()},
        "seed": cfg.seed,
        "started": started,
        "trainable_parameters": runner.trainable_count(),
        "trainable_per_task": {t.name: runner.trainable_count(t.name) for t in data.tasks},
        "result": asdict(result),
        "versions": versions(),
        "groups": groups,
        "cgc": asdict(runner.handle.spec) if strategy == "cgc" else None,
    }
    (out_dir / "run.json").write_text(json.dumps(record, indent=2))
