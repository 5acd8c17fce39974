"""`tasktune compare` and `tasktune demo`: train every strategy on the same data, evaluate
all on the same test sets, measure costs, transfer and forgetting, write the report.

This is the product's answer to "one model for all tasks, or one adapter per task?".
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from tasktune.config import ProjectConfig, config_from_dict
from tasktune.eval.evaluate import evaluate_runner, gold_of
from tasktune.eval.forgetting import forgetting_report
from tasktune.eval.report import write_report
from tasktune.eval.results import (
    ComparisonResults, Costs, Environment, ForgettingDelta, StrategyResult, TaskInfo, TrainingCurve, TransferMatrix,
)
from tasktune.errors import TasktuneError
from tasktune.eval.grouping import group_tasks
from tasktune.eval.transfer import task_affinity
from tasktune.eval.verdict import compute_verdict, print_verdict
from tasktune.model.load import load_model, load_tokenizer, model_family
from tasktune.model.plan import check_strategy
from tasktune.model.runner import Runner
from tasktune.train.run import PreparedData, build_runner, prepare_data, train_strategy, versions


def read_curves(metrics_path: Path) -> TrainingCurve:
    curve = TrainingCurve()
    if not metrics_path.exists():
        return curve
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "task_loss" in r]
    tasks = sorted({t for r in rows for t in r["task_loss"]})
    curve.steps = [r["step"] for r in rows]
    curve.losses = {t: [r["task_loss"].get(t) for r in rows] for t in tasks}
    return curve


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def measure_costs(runner: Runner, seconds: float, peak_mb: float, data: PreparedData) -> Costs:
    """Training and serving costs, and the cost of adding one more task: `single` trains
    one new adapter on the new task's examples only; a shared adapter (or full model) is
    retrained on all N+1 tasks' examples. Both are estimated from this run's measured
    time per training example, with the new task the size of an average task."""
    n_tasks = max(len(data.tasks), 1)
    serving = _param_bytes(runner)  # base + every adapter and head this strategy serves
    if runner.plan.strategy == "single":
        add_seconds = seconds / n_tasks
        add_params = runner.trainable_count() // n_tasks
    else:
        add_seconds = seconds * (n_tasks + 1) / n_tasks
        add_params = runner.trainable_count()
    return Costs(
        trainable_params=runner.trainable_count(), train_seconds=seconds, peak_memory_mb=peak_mb,
        serving_memory_mb=serving / 2**20, add_task_seconds=add_seconds, add_task_params=add_params,
    )


def _groups_from(transfer: TransferMatrix | None, cfg: ProjectConfig) -> list[list[str]]:
    if transfer is None:
        raise TasktuneError("no affinity matrix to group tasks by (needs `multi` with validation data for 2+ tasks)")
    z = {i: {j: transfer.values[a][b] for b, j in enumerate(transfer.tasks)} for a, i in enumerate(transfer.tasks)}
    return group_tasks(z, k=cfg.group_k, seed=cfg.seed)


def run_compare(
    cfg: ProjectConfig,
    strategies: list[str],
    out: Path,
    *,
    skip_invalid: bool = False,
    console: Console | None = None,
    n_resamples: int = 1000,
) -> ComparisonResults:
    console = console or Console()
    for strategy in strategies:
        check_strategy(strategy)  # before hours of training the others
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    family = model_family(cfg.model)
    data = prepare_data(cfg, family, skip_invalid=skip_invalid, tokenizer=load_tokenizer(cfg.model))
    for task, why in data.skipped_tasks.items():
        console.print(f"[yellow]skipped task {task}[/]: {why}")
    weights = {e.task_name: e.weight for e in cfg.tasks}
    tasks_info = {
        t.name: TaskInfo.from_task(t, [gold_of(t, ex) for ex in data.test.get(t.name, [])], weights.get(t.name, 1.0))
        for t in data.tasks if data.test.get(t.name)
    }
    results: dict[str, StrategyResult] = {}
    forgetting: list[ForgettingDelta] = []
    transfer = None
    # `grouped` clusters tasks by the affinity measured on `multi`, so it goes last
    order = sorted(strategies, key=lambda s: s == "grouped")
    if "grouped" in order and not cfg.groups and "multi" not in order:
        raise TasktuneError("strategy 'grouped' needs `groups:` in the config or `multi` in --strategies (for the affinity matrix)")
    for strategy in order:
        console.rule(f"strategy {strategy}")
        run_dir = out / strategy
        groups = None
        if strategy == "grouped":
            groups = cfg.groups or _groups_from(transfer, cfg)
            console.print(f"task groups: {groups}", highlight=False)
        runner, trained, _ = train_strategy(cfg, strategy, run_dir, data=data, skip_invalid=skip_invalid, groups=groups)
        started = time.perf_counter()
        scores = evaluate_runner(runner, data.test, n_resamples=n_resamples, seed=cfg.seed)
        results[strategy] = StrategyResult(
            name=strategy, tasks=scores, curves=read_curves(run_dir / "metrics.jsonl"),
            costs=measure_costs(runner, trained.seconds, trained.peak_memory_mb, data),
            notes={"steps": trained.steps, "eval_seconds": time.perf_counter() - started, "run_dir": str(run_dir),
                   **({"groups": groups} if groups else {}),
                   **({"cgc_gates": json.loads((run_dir / "cgc_gates.json").read_text())} if strategy == "cgc" else {})},
        )
        # `full` changes the base itself: compare against a freshly loaded copy
        base = build_runner(cfg, load_model(cfg.model), data.tasks, "full") if runner.handle is None else None
        forgetting += ForgettingDelta.from_report(strategy, forgetting_report(runner, base))
        if strategy == "multi" and len(data.tasks) > 1:
            val = {t: v for t, v in data.validation.items() if v}
            if len(val) > 1:
                z = task_affinity(runner, data.train, val, seed=cfg.seed)
                transfer = TransferMatrix.from_nested(
                    z, "Z[i][j] = 1 - L_i(after one step on task j) / L_i(before), on the shared adapter (Fifty et al. 2021)"
                )
        del runner
    env_versions = versions()
    env = Environment(
        versions=env_versions, device=env_versions["device"], seeds={"seed": cfg.seed},
        config=json.loads(cfg.model_dump_json()), created=datetime.now(timezone.utc).isoformat(),
    )
    comparison = ComparisonResults(tasks=tasks_info, strategies=results, transfer=transfer, forgetting=forgetting, environment=env)
    verdict = compute_verdict(comparison, baseline=strategies[0], n_resamples=n_resamples, seed=cfg.seed)
    paths = write_report(comparison, out, verdict=verdict, n_resamples=n_resamples, seed=cfg.seed)
    print_verdict(verdict, console)
    console.print(f"report: {paths['html']}", highlight=False)
    return comparison


def demo_config() -> ProjectConfig:
    """The CPU demo: the embedded MiniLM-L6 on CLINC150 and SNIPS (intent + slots)
    subsets, sized to finish `single` vs `multi` in well under 15 minutes on 2 cores."""
    return config_from_dict({
        "model": "minilm",
        "seed": 0,
        "max_length": 64,
        "tasks": [
            {"builtin": "clinc150", "max_examples": {"train": 4500, "validation": 300, "test": 1500}},
            {"builtin": "snips_intent", "max_examples": {"train": 1500, "validation": 200, "test": 700}},
            {"builtin": "snips_slots", "max_examples": {"train": 1500, "validation": 200, "test": 700}},
        ],
        "mixing": {"policy": "proportional"},
        "lora": {"r": 8, "alpha": 16},
        "train": {"lr": 1e-3, "head_lr": 3e-3, "batch_size": 32, "epochs": 2, "log_every": 10, "warmup_ratio": 0.05},
    })


def run_demo(out: Path, *, console: Console | None = None) -> ComparisonResults:
    return run_compare(demo_config(), ["single", "multi"], out, console=console)

