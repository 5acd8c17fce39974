"""The answer to "one model for all tasks, or one adapter per task?", from the results.

Per task: the strategy with the best primary metric wins; the difference to the
runner-up is called significant by

- a paired bootstrap on the stored predictions (p < alpha), when the task's gold values
  and both strategies' predictions are in the results - the better test, since both
  strategies saw the same examples; otherwise
- non-overlapping 95% intervals (conservative: overlapping intervals can still hide a
  significant paired difference).

Each row says which method it used. The aggregate ranking is the weighted mean of the
primary metrics (TaskInfo.weight) with a joint-resampling interval when every task has
predictions, else an interval propagated from the per-task ones (bootstrap.py).
Negative transfer: a shared strategy (anything but the per-task baseline, `single`)
scoring below the baseline on a task beyond the interval (paired CI of the difference
entirely below 0, or non-overlapping CIs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasktune.eval.bootstrap import (
    N_RESAMPLES,
    Interval,
    PairedResult,
    paired_from_scores,
    percentile_ci,
    propagated_aggregate,
    replicates,
    weighted_aggregate,
)
from tasktune.eval.metrics import Metric, per_example_scores
from tasktune.eval.results import ComparisonResults, MetricValue

STRATEGY_WORDS = {
    "single": "one LoRA adapter per task",
    "multi": "one multi-task adapter for all tasks",
    "full": "one fully fine-tuned model for all tasks",
    "cgc": "CGC-LoRA (shared + task-specific experts)",
    "grouped": "one adapter per cluster of related tasks",
}


@dataclass
class Comparison:
    """A vs B on one task's primary metric: value(A) - value(B) and its test."""

    diff: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    significant: bool
    method: str  # "paired bootstrap" | "CI overlap" | "no CI"


@dataclass
class TaskVerdict:
    task: str
    metric: str
    winner: str
    value: float
    runner_up: str | None = None
    runner_up_value: float | None = None
    comparison: Comparison | None = None


@dataclass
class RankEntry:
    strategy: str
    rank: int
    aggregate: float
    ci_low: float
    ci_high: float
    wins: int
    n_tasks: int
    method: str  # "joint resampling" | "propagated"


@dataclass
class NegativeTransfer:
    task: str
    metric: str
    strategy: str
    baseline: str
    comparison: Comparison


@dataclass
class Verdict:
    tasks: list[TaskVerdict] = field(default_factory=list)
    ranking: list[RankEntry] = field(default_factory=list)
    negative_transfer: list[NegativeTransfer] = field(default_factory=list)
    answer: str = ""


def _paired_ready(results: ComparisonResults, task: str, *strategies: str) -> bool:
    info = results.tasks[task]
    if info.golds is None:
        return False
    for s in strategies:
        preds = results.strategies[s].tasks[task].predictions
        if preds is None or len(preds) != len(info.golds):
            return False
    return True


class _Scorer:
    """Caches per-example statistics per (strategy, task) so each is computed once."""

    def __init__(self, results: ComparisonResults, n_resamples: int, seed: int):
        self.results, self.n_resamples, self.seed = results, n_resamples, seed
        self._cache: dict[tuple[str, str], object] = {}
        self._order = {t: i for i, t in enumerate(results.tasks)}

    def scores(self, strategy: str, task: str):
        key = (strategy, task)
        if key not in self._cache:
            info = self.results.tasks[task]
            metric = Metric(info.kind, info.primary_metric, info.label_map, info.name)
            self._cache[key] = metric.scores(self.results.strategies[strategy].tasks[task].predictions, info.golds)
        return self._cache[key]

    def task_seed(self, task: str) -> int:
        return self.seed + 7919 * self._order[task]  # same per task across strategies: paired

    def paired(self, a: str, b: str, task: str) -> PairedResult:
        metric = self.results.tasks[task].primary_metric
        sa, sb = self.scores(a, task), self.scores(b, task)
        return paired_from_scores(sa, sb, metric, n_resamples=self.n_resamples, seed=self.task_seed(task))

    def replicates(self, strategy: str, task: str) -> np.ndarray:
        metric = self.results.tasks[task].primary_metric
        return replicates(self.scores(strategy, task), self.n_resamples, self.task_seed(task))[metric]


def _compare(scorer: _Scorer, task: str, a: str, b: str, alpha: float) -> Comparison:
    results = scorer.results
    metric = results.tasks[task].primary_metric
    va, vb = (results.strategies[s].tasks[task].metrics[metric] for s in (a, b))
    diff = (va.value or 0.0) - (vb.value or 0.0)
    if _paired_ready(results, task, a, b):
        r = scorer.paired(a, b, task)
        return Comparison(r.diff, r.ci_low, r.ci_high, r.p_value, r.p_value < alpha, "paired bootstrap")
    if None in (va.ci_low, va.ci_high, vb.ci_low, vb.ci_high):
        return Comparison(diff, None, None, None, False, "no CI")
    apart = va.ci_low > vb.ci_high or vb.ci_low > va.ci_high  # type: ignore[operator]
    return Comparison(diff, None, None, None, bool(apart), "CI overlap")


def _value(mv: MetricValue | None) -> float | None:
    return None if mv is None or mv.value is None or not np.isfinite(mv.value) else float(mv.value)


def _task_verdicts(results: ComparisonResults, scorer: _Scorer, alpha: float) -> list[TaskVerdict]:
    out = []
    for task, info in results.tasks.items():
        scored = []
        for name, strat in results.strategies.items():
            tr = strat.tasks.get(task)
            v = _value(tr.metrics.get(info.primary_metric)) if tr else None
            if v is not None:
                scored.append((v, name))
        if not scored:
            continue
        scored.sort(key=lambda x: -x[0])  # stable: ties keep strategy order
        (v1, s1), rest = scored[0], scored[1:]
        tv = TaskVerdict(task=task, metric=info.primary_metric, winner=s1, value=v1)
        if rest:
            v2, s2 = rest[0]
            tv.runner_up, tv.runner_up_value = s2, v2
            tv.comparison = _compare(scorer, task, s1, s2, alpha)
        out.append(tv)
    return out


def _negative_transfer(results: ComparisonResults, scorer: _Scorer, baseline: str, alpha: float) -> list[NegativeTransfer]:
    if baseline not in results.strategies:
        return []
    flags = []
    base = results.strategies[baseline]
    for task, info in results.tasks.items():
        if task not in base.tasks or _value(base.tasks[task].metrics.get(info.primary_metric)) is None:
            continue
        for name, strat in results.strategies.items():
            tr = strat.tasks.get(task)
            if name == baseline or tr is None or _value(tr.metrics.get(info.primary_metric)) is None:
                continue
            c = _compare(scorer, task, name, baseline, alpha)
            worse = c.ci_high < 0 if c.method == "paired bootstrap" else (c.significant and c.diff < 0)
            if worse:
                flags.append(NegativeTransfer(task, info.primary_metric, name, baseline, c))
    return flags


def _ranking(results: ComparisonResults, scorer: _Scorer, verdicts: list[TaskVerdict], alpha: float) -> list[RankEntry]:
    weights = {t: info.weight for t, info in results.tasks.items()}
    wins = {s: sum(v.winner == s for v in verdicts) for s in results.strategies}
    entries = []
    for name, strat in results.strategies.items():
        tasks = [t for t in results.tasks if t in strat.tasks and _value(strat.tasks[t].metrics.get(results.tasks[t].primary_metric)) is not None]
        if not tasks:
            continue
        mvs = {t: strat.tasks[t].metrics[results.tasks[t].primary_metric] for t in tasks}
        if all(_paired_ready(results, t, name) for t in tasks):
            points = {t: float(mvs[t].value) for t in tasks}  # type: ignore[arg-type]
            agg, _ = weighted_aggregate(points, {t: scorer.replicates(name, t) for t in tasks}, weights, alpha)
            method = "joint resampling"
        else:
            ivs = {t: Interval(float(m.value), *(float(x) if x is not None else float(m.value) for x in (m.ci_low, m.ci_high))) for t, m in mvs.items()}  # type: ignore[arg-type]
            agg, method = propagated_aggregate(ivs, weights, alpha), "propagated"
        entries.append(RankEntry(name, 0, agg.value, agg.ci_low, agg.ci_high, wins[name], len(tasks), method))
    # strategies evaluated on every task first, then by aggregate
    entries.sort(key=lambda e: (-e.n_tasks, -e.aggregate))
    for i, e in enumerate(entries):
        e.rank = i + 1
    return entries


def _aggregate_gap(results: ComparisonResults, scorer: _Scorer, a: str, b: str, alpha: float) -> tuple[float, float] | None:
    """Paired CI of aggregate(a) - aggregate(b) when both have predictions on every task."""
    tasks = list(results.tasks)
    if not all(t in results.strategies[s].tasks for s in (a, b) for t in tasks):
        return None
    if not all(_paired_ready(results, t, a, b) for t in tasks):
        return None
    w = np.array([results.tasks[t].weight for t in tasks], dtype=float)
    diff = sum(wt * (scorer.replicates(a, t) - scorer.replicates(b, t)) for wt, t in zip(w, tasks)) / w.sum()
    return percentile_ci(np.asarray(diff), alpha)


def _answer(results: ComparisonResults, scorer: _Scorer, ranking: list[RankEntry], verdicts, neg, alpha: float) -> str:
    if not ranking:
        return "No results to compare."
    top = ranking[0]
    words = STRATEGY_WORDS.get(top.strategy, top.strategy)
    text = (
        f"Best overall: {words} ('{top.strategy}'), weighted primary score {top.aggregate:.1%} "
        f"[{top.ci_low:.1%}, {top.ci_high:.1%}]; it wins {top.wins} of {len(verdicts)} tasks."
    )
    if len(ranking) > 1:
        second = ranking[1]
        gap = _aggregate_gap(results, scorer, top.strategy, second.strategy, alpha)
        if gap is not None:
            sig = gap[0] > 0
            how = f"paired 95% CI of the gap [{gap[0]:+.1%}, {gap[1]:+.1%}]"
        else:
            sig = top.ci_low > second.ci_high
            how = "intervals " + ("do not overlap" if sig else "overlap")
        text += (
            f" Runner-up '{second.strategy}' at {second.aggregate:.1%}; the difference is "
            f"{'significant' if sig else 'not significant'} ({how})."
        )
    if neg:
        where = ", ".join(f"{n.strategy} on {n.task}" for n in neg)
        text += f" Negative transfer (worse than the per-task baseline beyond the CI): {where}."
    return text


def compute_verdict(
    results: ComparisonResults,
    *,
    baseline: str = "single",
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    alpha: float = 0.05,
) -> Verdict:
    """Per-task winners with significance, aggregate ranking, negative-transfer flags and
    a one-paragraph answer. Deterministic for a given seed."""
    scorer = _Scorer(results, n_resamples, seed)
    verdicts = _task_verdicts(results, scorer, alpha)
    neg = _negative_transfer(results, scorer, baseline, alpha)
    ranking = _ranking(results, scorer, verdicts, alpha)
    return Verdict(verdicts, ranking, neg, _answer(results, scorer, ranking, verdicts, neg, alpha))


VERDICT_HEADERS = ["task", "metric", "winner", "score", "runner-up", "score", "difference", "significant", "test"]


def verdict_rows(verdict: Verdict) -> list[list[str]]:
    """The per-task verdict table as strings (headers: VERDICT_HEADERS)."""
    rows = []
    for v in verdict.tasks:
        c = v.comparison
        diff = "" if c is None else f"{c.diff:+.1%}" + (f" [{c.ci_low:+.1%}, {c.ci_high:+.1%}]" if c.ci_low is not None else "")
        sig = "" if c is None else ("yes" if c.significant else "no") + (f" (p={c.p_value:.3f})" if c.p_value is not None else "")
        rows.append([
            v.task, v.metric, v.winner, f"{v.value:.1%}", v.runner_up or "-",
            "" if v.runner_up_value is None else f"{v.runner_up_value:.1%}", diff, sig, "" if c is None else c.method,
        ])
    return rows


def ranking_rows(verdict: Verdict) -> list[list[str]]:
    """Headers: rank, strategy, weighted score, 95% CI, task wins, tasks, CI method."""
    return [
        [str(e.rank), e.strategy, f"{e.aggregate:.1%}", f"[{e.ci_low:.1%}, {e.ci_high:.1%}]", str(e.wins), str(e.n_tasks), e.method]
        for e in verdict.ranking
    ]


def print_verdict(verdict: Verdict, console=None) -> None:
    """Print the verdict with rich (tables + the answer paragraph)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="Per-task verdict")
    for h in VERDICT_HEADERS:
        table.add_column(h)
    for row in verdict_rows(verdict):
        table.add_row(*row)
    console.print(table)
    ranking = Table(title="Aggregate ranking")
    for h in ["rank", "strategy", "weighted score", "95% CI", "wins", "tasks", "CI method"]:
        ranking.add_column(h)
    for row in ranking_rows(verdict):
        ranking.add_row(*row)
    console.print(ranking)
    console.print(verdict.answer)
