"""Rebuild a trained runner from a run folder (what `eval`, `export` and `serve` read)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tasktune.config import ProjectConfig
from tasktune.errors import TasktuneError
from tasktune.lora.peft_io import load_adapter_into
from tasktune.model.heads import load_head
from tasktune.model.load import load_model
from tasktune.model.plan import plan_for
from tasktune.model.runner import Runner
from tasktune.tasks.from_config import build_tasks
from tasktune.tasks.spec import Task


def read_run(run_dir: Path) -> tuple[ProjectConfig, dict]:
    run_dir = Path(run_dir)
    for name in ("run.json", "config.json"):
        if not (run_dir / name).is_file():
            raise TasktuneError(f"{run_dir}: not a tasktune run folder (no {name}); run `tasktune train` first")
    cfg = ProjectConfig.model_validate_json((run_dir / "config.json").read_text())
    return cfg, json.loads((run_dir / "run.json").read_text())


def run_tasks(cfg: ProjectConfig, record: dict) -> list[Task]:
    """The tasks a run was trained on, with their label sets as resolved at training time
    (user tasks may infer them from their data)."""
    labels = record.get("labels", {})
    return [
        replace(t, labels=tuple(labels[t.name])) if labels.get(t.name) else t
        for t in build_tasks(cfg) if t.name in record["tasks"]
    ]


def run_task_adapters(record: dict) -> dict[str, str]:
    """task -> the adapter (folder under adapters/) that answers it; a cgc run is saved
    folded, one adapter per task, named after it."""
    if record.get("strategy") == "cgc":
        return {t: t for t in record["tasks"]}
    return dict(record.get("task_adapter") or {})


def restore_runner(run_dir: Path) -> Runner:
    run_dir = Path(run_dir)
    cfg, record = read_run(run_dir)
    strategy = record["strategy"]
    if strategy == "cgc" and cfg.lora.input_gate:
        raise TasktuneError(f"{run_dir}: an input-gated CGC run cannot be folded into adapters; compare evaluates it in place")
    if strategy == "full":
        loaded = load_model(str(run_dir / "model"))
    else:
        loaded = load_model(cfg.model)
    tasks = run_tasks(cfg, record)
    # a cgc run is saved folded: one plain adapter per task, served like `single`
    plan = plan_for("single" if strategy == "cgc" else strategy, [t.name for t in tasks], record.get("groups"))
    max_length = min(cfg.max_length, loaded.max_length or cfg.max_length)
    runner = Runner(loaded, tasks, plan, cfg.lora, max_length=max_length, seed=cfg.seed)
    if runner.handle is not None:
        for name in plan.adapters:
            load_adapter_into(runner.handle, name, run_dir / "adapters" / name)
    for task in list(runner.heads.keys()):
        runner.heads[task] = load_head(run_dir / "heads", task)
    runner.eval()
    return runner
