"""Run a trained runner over every task's test split and score it with CIs.

Predictions come from the shared runner (tasktune.model.predict), so the evaluated model
is exactly the trained and exported one. Invalid outputs stay in the denominator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tasktune.eval.results import TaskResult
from tasktune.model.predict import predict
from tasktune.model.runner import Runner
from tasktune.tasks.spec import Example, Task


def gold_of(task: Task, example: Example) -> Any:
    if task.kind == "generation":
        return list(example.all_references)
    if task.kind == "tagging":
        return list(example.target)
    return example.target


def input_of(task: Task, example: Example) -> str:
    if task.kind == "tagging":
        return " ".join(example.inputs["tokens"])
    return " | ".join(str(example.inputs[f]) for f in task.input_fields)


def evaluate_runner(
    runner: Runner,
    test_data: dict[str, list[Example]],
    *,
    mode: str = "auto",
    n_resamples: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, TaskResult]:
    out: dict[str, TaskResult] = {}
    for name in tqdm(list(test_data), desc="evaluate", disable=not progress):
        task = runner.tasks.get(name)
        examples = test_data[name]
        if task is None or not examples:
            continue
        preds = predict(runner, task, examples, mode=mode)
        out[name] = TaskResult.from_predictions(
            task.kind,
            [p.value if p.valid else None for p in preds],
            [gold_of(task, ex) for ex in examples],
            inputs=[input_of(task, ex) for ex in examples],
            uids=[ex.uid for ex in examples],
            labels=list(task.labels) if task.kind in ("classification", "yesno") and task.labels else None,
            label_map=task.label_map,
            task_name=task.name,
            n_resamples=n_resamples,
            seed=seed,
        )
    return out


@dataclass
class RunEvaluation:
    """What `tasktune eval` found: scores per task, and the test rows it could not score
    (invalid records, each as 'file:line: field ...: what is wrong'), per task."""

    scores: dict[str, TaskResult]
    skipped: dict[str, list[str]]


def evaluate_run(run_dir: Path, *, mode: str = "auto", n_resamples: int = 1000) -> RunEvaluation:
    """`tasktune eval RUN_DIR`: restore the run, score its tasks' test splits, write eval.json.
    Invalid test rows are left out of the scores and listed (returned, and in eval.json), so
    nothing disappears silently."""
    from dataclasses import asdict

    from tasktune.data.load import load_tasks
    from tasktune.model.restore import read_run, restore_runner

    cfg, record = read_run(run_dir)
    runner = restore_runner(run_dir)
    tasks = list(runner.tasks.values())
    max_examples = {e.task_name: e.max_examples for e in cfg.tasks if e.max_examples is not None}
    loaded = load_tasks(tasks, skip_invalid=True, max_examples=max_examples or None)
    test = {t.name: loaded[t.name]["test"].examples for t in tasks if "test" in loaded[t.name]}
    skipped = {t.name: [str(i) for i in loaded[t.name]["test"].skipped] for t in tasks
               if "test" in loaded[t.name] and loaded[t.name]["test"].skipped}
    scores = evaluate_runner(runner, test, mode=mode, n_resamples=n_resamples, seed=cfg.seed)
    payload = {t: {"metrics": {k: asdict(v) for k, v in r.metrics.items()}, "n": r.n, "invalid": r.invalid,
                   "skipped_test_rows": skipped.get(t, [])} for t, r in scores.items()}
    (Path(run_dir) / "eval.json").write_text(json.dumps(payload, indent=2))
    return RunEvaluation(scores, skipped)


def print_scores(scores: dict[str, TaskResult], console) -> None:
    from rich.table import Table

    table = Table(title="Test scores (95% bootstrap CI)")
    for col in ("task", "metric", "value", "95% CI", "n", "invalid"):
        table.add_column(col)
    for task, result in scores.items():
        for i, (name, m) in enumerate(result.metrics.items()):
            if m.value is None:
                continue
            ci = f"[{m.ci_low:.3f}, {m.ci_high:.3f}]" if m.ci_low is not None else ""
            table.add_row(task if i == 0 else "", name, f"{m.value:.3f}", ci, str(result.n) if i == 0 else "", str(result.invalid) if i == 0 else "")
    console.print(table)
