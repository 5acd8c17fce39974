"""Verdict on synthetic results whose right answer is known by construction."""

from __future__ import annotations

import random

import pytest
from rich.console import Console

from tasktune.eval.results import ComparisonResults, MetricValue, StrategyResult, TaskInfo, TaskResult
from tasktune.eval.verdict import VERDICT_HEADERS, compute_verdict, print_verdict, ranking_rows, verdict_rows

LABELS = ["a", "b", "c", "d"]


def _preds(golds, p_correct, seed):
    rng = random.Random(seed)
    return [g if rng.random() < p_correct else rng.choice([x for x in LABELS if x != g]) for g in golds]


def _paired_results(weights=(1.0, 1.0)) -> ComparisonResults:
    """Task 'hard': single 90% vs multi 60% (a real gap). Task 'easy': both ~85%,
    different errors (no real gap)."""
    rng = random.Random(0)
    golds = {t: [rng.choice(LABELS) for _ in range(400)] for t in ("hard", "easy")}
    tasks = {t: TaskInfo(t, "classification", "accuracy", w, LABELS, None, golds[t]) for t, w in zip(golds, weights)}
    plan = {"single": {"hard": (0.9, 1), "easy": (0.85, 2)}, "multi": {"hard": (0.6, 3), "easy": (0.86, 4)}}
    strategies = {}
    for name, per_task in plan.items():
        res = {
            t: TaskResult.from_predictions("classification", _preds(golds[t], q, s), golds[t], n_resamples=200)
            for t, (q, s) in per_task.items()
        }
        strategies[name] = StrategyResult(name, res)
    return ComparisonResults(tasks, strategies)


def test_paired_verdict_winners_significance_and_negative_transfer():
    v = compute_verdict(_paired_results(), n_resamples=500)
    by_task = {t.task: t for t in v.tasks}
    hard, easy = by_task["hard"], by_task["easy"]
    assert hard.winner == "single" and hard.runner_up == "multi"
    assert hard.comparison.method == "paired bootstrap"
    assert hard.comparison.significant and hard.comparison.ci_low > 0.2
    assert hard.comparison.diff == pytest.approx(hard.value - hard.runner_up_value)
    assert not easy.comparison.significant and easy.comparison.ci_low < 0 < easy.comparison.ci_high
    assert [(n.strategy, n.task) for n in v.negative_transfer] == [("multi", "hard")]
    assert [e.strategy for e in v.ranking] == ["single", "multi"]
    assert v.ranking[0].method == "joint resampling"
    assert v.ranking[0].ci_low <= v.ranking[0].aggregate <= v.ranking[0].ci_high
    assert "'single'" in v.answer and "Negative transfer" in v.answer and "multi on hard" in v.answer


def test_verdict_is_deterministic_for_a_seed():
    r = _paired_results()
    assert compute_verdict(r, n_resamples=200, seed=5) == compute_verdict(r, n_resamples=200, seed=5)


def test_weights_change_the_aggregate():
    r = _paired_results(weights=(0.0001, 10.0))  # almost only 'easy' counts: multi edges ahead
    v = compute_verdict(r, n_resamples=200)
    easy_values = {s: r.strategies[s].tasks["easy"].metrics["accuracy"].value for s in r.strategies}
    best = max(easy_values, key=easy_values.get)
    assert v.ranking[0].strategy == best
    assert v.ranking[0].aggregate == pytest.approx(easy_values[best], abs=1e-3)


def _ci_only_results() -> ComparisonResults:
    def tr(value, lo, hi):
        return TaskResult({"slot_f1": MetricValue(value, lo, hi)}, n=100, invalid=0)

    tasks = {"t1": TaskInfo("t1", "tagging", "slot_f1"), "t2": TaskInfo("t2", "tagging", "slot_f1")}
    strategies = {
        "single": StrategyResult("single", {"t1": tr(0.90, 0.86, 0.94), "t2": tr(0.70, 0.60, 0.80)}),
        "multi": StrategyResult("multi", {"t1": tr(0.70, 0.65, 0.75), "t2": tr(0.72, 0.62, 0.82)}),
        "cgc": StrategyResult("cgc", {"t1": tr(0.80, 0.75, 0.85)}),  # not evaluated on t2
    }
    return ComparisonResults(tasks, strategies)


def test_ci_overlap_fallback_without_predictions():
    v = compute_verdict(_ci_only_results())
    t1, t2 = v.tasks
    assert (t1.winner, t1.runner_up, t1.comparison.method) == ("single", "cgc", "CI overlap")
    assert t1.comparison.significant  # [0.86, 0.94] vs [0.75, 0.85]
    assert (t2.winner, t2.runner_up) == ("multi", "single") and not t2.comparison.significant
    assert {(n.strategy, n.task) for n in v.negative_transfer} == {("multi", "t1"), ("cgc", "t1")}
    # complete strategies rank before the partial one; propagated CI around the mean
    assert [e.strategy for e in v.ranking] == ["single", "multi", "cgc"]
    single = v.ranking[0]
    assert single.method == "propagated" and single.aggregate == pytest.approx(0.80)
    se = ((0.08 / 3.92) ** 2 + (0.20 / 3.92) ** 2) ** 0.5 / 2
    assert single.ci_high - single.ci_low == pytest.approx(2 * 1.96 * se, rel=1e-3)


def test_rows_and_rich_printing():
    v = compute_verdict(_ci_only_results())
    rows = verdict_rows(v)
    assert all(len(r) == len(VERDICT_HEADERS) for r in rows)
    assert rows[0][:4] == ["t1", "slot_f1", "single", "90.0%"] and rows[0][7] == "yes"
    assert ranking_rows(v)[0][:3] == ["1", "single", "80.0%"]
    console = Console(record=True, width=200)
    print_verdict(v, console)
    text = console.export_text()
    assert "Per-task verdict" in text and "CI overlap" in text and v.answer.split(";")[0] in text.replace("\n", " ")
