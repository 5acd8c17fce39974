"""What `tasktune compare` produces: the results schema, and its JSON form.

Plain dataclasses, filled by the trainer and evaluator and read by verdict.py and
report.py; nothing here computes. `ComparisonResults.to_json()` writes standard JSON
(non-finite floats become null) and `from_json` reads it back into the same dataclasses,
so a report can be rebuilt from `results.json` alone.

Layout:
    ComparisonResults
      tasks: task -> TaskInfo           (kind, primary metric, aggregate weight, gold values)
      strategies: name -> StrategyResult
          tasks: task -> TaskResult     (metrics with CIs, n, invalid, confusion, errors, predictions)
          curves: TrainingCurve         (step -> per-task loss)
          costs: Costs
      transfer: TransferMatrix | None   (tasks x tasks affinity)
      forgetting: list[ForgettingDelta]
      environment: Environment

`TaskInfo.golds` and `TaskResult.predictions` are optional; when both are present the
verdict uses a paired bootstrap on the stored predictions, otherwise it compares the
stored intervals.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

SCHEMA_VERSION = 1


@dataclass
class MetricValue:
    """A metric's value in [0, 1] and its 95% bootstrap interval (None if not computed)."""

    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None


@dataclass
class ConfusionPair:
    gold: str
    predicted: str
    count: int

    def describe(self) -> str:
        return f"'{self.gold}' predicted as '{self.predicted}' {self.count} time{'s' if self.count != 1 else ''}"


@dataclass
class ClassStats:
    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class ConfusionSummary:
    """Confusion matrix of a classification/yes-no task. `matrix[i][j]` counts gold
    `labels[i]` predicted as `labels[j]`; the last label is "<invalid>" when any output
    could not be parsed."""

    labels: list[str]
    matrix: list[list[int]]
    top_confusions: list[ConfusionPair] = field(default_factory=list)
    per_class: list[ClassStats] = field(default_factory=list)


@dataclass
class ErrorSample:
    input: str
    expected: str
    predicted: str | None
    uid: str = ""


@dataclass
class TaskResult:
    """One strategy on one task's test set."""

    metrics: dict[str, MetricValue]
    n: int
    invalid: int
    confusion: ConfusionSummary | None = None
    errors: list[ErrorSample] = field(default_factory=list)
    predictions: list[Any] | None = None  # parsed outputs in TaskInfo.golds order; None = invalid

    @classmethod
    def from_predictions(
        cls,
        kind: str,
        preds: list[Any],
        golds: list[Any],
        *,
        inputs: list[Any] | None = None,
        uids: list[str] | None = None,
        labels: list[str] | None = None,
        label_map: dict[str, str] | None = None,
        task_name: str | None = None,
        n_resamples: int = 1000,
        seed: int = 0,
        n_errors: int = 10,
        keep_predictions: bool = True,
    ) -> "TaskResult":
        """Score one strategy's parsed predictions on one task: every metric with its
        bootstrap CI, the confusion summary (classification, yes/no) and a seeded error
        sample (generation: the examples below the median ROUGE-L). The evaluator's one call."""
        import numpy as np

        from tasktune.eval import confusion
        from tasktune.eval.bootstrap import bootstrap_ci
        from tasktune.eval.metrics import per_example_scores

        scores = per_example_scores(kind, preds, golds, labels=labels, label_map=label_map, task_name=task_name)
        cis = bootstrap_ci(scores, n_resamples=n_resamples, seed=seed)
        metrics = {k: MetricValue(v.value, v.ci_low, v.ci_high) for k, v in cis.items()}
        summary = confusion.summarize(preds, golds, labels) if kind in ("classification", "yesno") else None
        wrong, shown = None, golds
        if kind == "generation":  # no "wrong" summary: show the weaker half, first reference
            rl = scores.per_example("rougeL")
            wrong = list(rl < float(np.median(rl))) if len(rl) else []
            shown = [g if isinstance(g, str) else (g[0] if g else "") for g in golds]
        errors = confusion.sample_errors(inputs if inputs is not None else [""] * len(golds), preds, shown,
                                         k=n_errors, seed=seed, wrong=wrong, uids=uids)
        invalid = int(round(scores.point()["invalid_rate"] * len(golds)))
        return cls(metrics, len(golds), invalid, summary, errors, list(preds) if keep_predictions else None)


@dataclass
class TrainingCurve:
    """Loss per task at logged steps: `losses[task][i]` is the loss at `steps[i]`
    (None where that task had no batch in the logging window)."""

    steps: list[int] = field(default_factory=list)
    losses: dict[str, list[float | None]] = field(default_factory=dict)


@dataclass
class Costs:
    """What a strategy costs. `add_task_*` is the cost of adding one new task: retrain
    one adapter (single) vs retrain on the whole mixture (multi)."""

    trainable_params: int | None = None
    train_seconds: float | None = None
    peak_memory_mb: float | None = None
    serving_memory_mb: float | None = None
    add_task_seconds: float | None = None
    add_task_params: int | None = None


@dataclass
class StrategyResult:
    name: str
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    curves: TrainingCurve = field(default_factory=TrainingCurve)
    costs: Costs = field(default_factory=Costs)
    notes: dict[str, Any] = field(default_factory=dict)  # strategy-specific extras (e.g. CGC gate weights)


@dataclass
class TaskInfo:
    """A task as the report needs it. `golds` holds the test set's gold values (labels,
    BIO tag lists, or reference lists) in the order of every strategy's predictions."""

    name: str
    kind: str
    primary_metric: str
    weight: float = 1.0
    labels: list[str] | None = None
    label_map: dict[str, str] | None = None
    golds: list[Any] | None = None

    @classmethod
    def from_task(cls, task: Any, golds: list[Any] | None = None, weight: float = 1.0) -> "TaskInfo":
        """From a tasks.spec.Task (duck-typed): its metric spelled as score_task names it."""
        from tasktune.eval.metrics import primary_metric

        labels = list(task.labels) if task.labels is not None else None
        label_map = dict(task.label_map) if task.label_map else None
        return cls(task.name, task.kind, primary_metric(task.kind, task.metric), weight, labels, label_map, golds)


@dataclass
class TransferMatrix:
    """values[i][j]: effect on task tasks[i] of training with task tasks[j] (e.g. the
    primary-metric change of pairwise multi-task training over single-task training);
    `description` says how it was measured."""

    tasks: list[str]
    values: list[list[float | None]]
    description: str = ""

    @classmethod
    def from_nested(cls, z: dict[str, dict[str, float]], description: str = "") -> "TransferMatrix":
        """From eval.transfer.task_affinity's Z[i][j] (row i evaluated, column j trained)."""
        tasks = list(z)
        return cls(tasks, [[z[i].get(j) for j in tasks] for i in tasks], description)


@dataclass
class ForgettingDelta:
    """General ability before and after tuning, on a held-out benchmark. `adapter` names
    the adapter measured when a strategy has several (single: one per task)."""

    strategy: str
    benchmark: str
    metric: str
    before: float
    after: float
    adapter: str = ""

    @classmethod
    def from_report(cls, strategy: str, report: dict[str, dict[str, Any]], benchmark: str = "held-out general text") -> list["ForgettingDelta"]:
        """From eval.forgetting.forgetting_report: adapter -> {metric, before, after, delta}."""
        return [cls(strategy, benchmark, str(r["metric"]), float(r["before"]), float(r["after"]), name) for name, r in report.items()]

    @property
    def delta(self) -> float:
        return self.after - self.before


@dataclass
class Environment:
    versions: dict[str, str] = field(default_factory=dict)  # python, torch, transformers, tasktune...
    device: str = ""
    seeds: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    created: str = ""  # ISO timestamp


@dataclass
class ComparisonResults:
    tasks: dict[str, TaskInfo]
    strategies: dict[str, StrategyResult]
    transfer: TransferMatrix | None = None
    forgetting: list[ForgettingDelta] = field(default_factory=list)
    environment: Environment = field(default_factory=Environment)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return _finite(dataclasses.asdict(self))

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ComparisonResults":
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(f"results schema version {version}; this tasktune reads version {SCHEMA_VERSION}")
        return _decode(cls, data)

    @classmethod
    def from_json(cls, text: str) -> "ComparisonResults":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ComparisonResults":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def _finite(obj: Any) -> Any:
    """NaN/inf -> None: JSON has no such numbers and browsers' JSON.parse rejects them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _decode(tp: Any, value: Any) -> Any:
    """Rebuild typed values from JSON data by the dataclasses' type hints."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(args[0], value) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        return tp(**{k: _decode(hints[k], v) for k, v in value.items() if k in names})
    if origin is dict:
        _, vt = typing.get_args(tp)
        return {k: _decode(vt, v) for k, v in value.items()}
    if origin is list:
        (et,) = typing.get_args(tp)
        return [_decode(et, v) for v in value]
    if tp is float and isinstance(value, int):
        return float(value)
    return value
