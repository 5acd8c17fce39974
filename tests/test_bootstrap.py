"""Bootstrap intervals, paired tests and aggregates against loop references."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from sklearn.metrics import f1_score

from tasktune.eval.bootstrap import (
    Interval,
    bootstrap_ci,
    paired_bootstrap,
    propagated_aggregate,
    replicates,
    resample_weights,
    weighted_aggregate,
)
from tasktune.eval.metrics import Metric, per_example_scores


def _noisy(golds, labels, p_correct, seed):
    rng = random.Random(seed)
    return [g if rng.random() < p_correct else rng.choice(labels) for g in golds]


LABELS = [f"c{i}" for i in range(8)]


def _golds(n, seed=0):
    rng = random.Random(seed)
    return [rng.choice(LABELS) for _ in range(n)]


def test_ci_contains_point_and_shrinks_with_n():
    widths = []
    for n in (100, 1600):
        golds = _golds(n)
        s = per_example_scores("classification", _noisy(golds, LABELS, 0.7, 1), golds)
        ci = bootstrap_ci(s, n_resamples=500, seed=0)
        for m in ("accuracy", "macro_f1", "invalid_rate"):
            assert ci[m].ci_low <= ci[m].value <= ci[m].ci_high
        widths.append(ci["accuracy"].ci_high - ci["accuracy"].ci_low)
    assert widths[1] < widths[0] / 2.5  # ~ 1/sqrt(16) = 1/4
    # binomial reference: 95% half-width ~ 1.96 * sqrt(p(1-p)/n)
    assert widths[1] == pytest.approx(2 * 1.96 * np.sqrt(0.74 * 0.26 / 1600), rel=0.25)


def test_resampled_corpus_metric_equals_recomputation_on_the_resample():
    """The matmul trick must give exactly sklearn's macro-F1 on each resampled set."""
    golds = _golds(60, seed=3)
    preds = _noisy(golds, LABELS, 0.5, 4)
    preds[5] = None
    s = per_example_scores("classification", preds, golds)
    reps = replicates(s, n_resamples=5, seed=7)["macro_f1"]
    weights = next(resample_weights(60, 5, seed=7))
    for b in range(5):
        idx = np.repeat(np.arange(60), weights[b].astype(int))
        g = [golds[i] for i in idx]
        p = [preds[i] if preds[i] is not None else "<inv>" for i in idx]
        labels = sorted(set(g) | {x for x in p if x != "<inv>"})
        assert reps[b] == pytest.approx(f1_score(g, p, labels=labels, average="macro", zero_division=0))


def test_paired_bootstrap_detects_a_real_difference_and_not_a_null_one():
    golds = _golds(600, seed=5)
    good, bad = _noisy(golds, LABELS, 0.85, 6), _noisy(golds, LABELS, 0.65, 7)
    acc = Metric("classification", "accuracy")
    real = paired_bootstrap(acc, good, bad, golds, seed=0)
    assert real.diff > 0.1 and real.ci_low > 0 and real.p_value < 0.01 and real.significant()
    null = paired_bootstrap(acc, good, list(good), golds, seed=0)
    assert null.diff == 0 and null.p_value == 1.0 and not null.significant()
    # two equally good but different systems: no significant difference
    other = _noisy(golds, LABELS, 0.85, 8)
    tie = paired_bootstrap(acc, good, other, golds, seed=0)
    assert tie.ci_low < 0 < tie.ci_high or tie.p_value > 0.05


def test_generic_callable_path_agrees_with_vectorised_path():
    golds = _golds(200, seed=9)
    a, b = _noisy(golds, LABELS, 0.8, 1), _noisy(golds, LABELS, 0.6, 2)

    def acc(p, g):
        return float(np.mean([x == y for x, y in zip(p, g)]))

    slow = paired_bootstrap(acc, a, b, golds, n_resamples=300, seed=1)
    fast = paired_bootstrap(Metric("classification", "accuracy"), a, b, golds, n_resamples=300, seed=1)
    assert slow.diff == pytest.approx(fast.diff)
    assert slow.ci_low == pytest.approx(fast.ci_low, abs=0.03) and slow.ci_high == pytest.approx(fast.ci_high, abs=0.03)


def test_paired_bootstrap_on_slot_f1():
    golds = [["B-a", "I-a", "O"], ["O", "B-b", "O"]] * 50
    perfect = [list(g) for g in golds]
    worse = [list(g) if i % 3 else ["O", "O", "O"] for i, g in enumerate(golds)]
    r = paired_bootstrap(Metric("tagging", "slot_f1"), perfect, worse, golds, seed=0)
    assert r.diff > 0 and r.ci_low > 0 and r.p_value < 0.05


def test_weighted_aggregate_joint_and_propagated():
    rng = np.random.default_rng(0)
    reps = {"a": rng.normal(0.8, 0.02, 4000), "b": rng.normal(0.4, 0.04, 4000)}
    agg, agg_reps = weighted_aggregate({"a": 0.8, "b": 0.4}, reps, {"a": 3.0, "b": 1.0})
    assert agg.value == pytest.approx(0.7)
    assert agg_reps.shape == (4000,)
    sd = np.sqrt((3 * 0.02) ** 2 + 0.04**2) / 4  # independent tasks
    assert agg.ci_high - agg.ci_low == pytest.approx(2 * 1.96 * sd, rel=0.1)
    prop = propagated_aggregate(
        {"a": Interval(0.8, 0.8 - 1.96 * 0.02, 0.8 + 1.96 * 0.02), "b": Interval(0.4, 0.4 - 1.96 * 0.04, 0.4 + 1.96 * 0.04)},
        {"a": 3.0, "b": 1.0},
    )
    assert prop.value == pytest.approx(0.7)
    assert prop.ci_high - prop.ci_low == pytest.approx(2 * 1.96 * sd, rel=0.01)


def test_seeded_and_fast_on_a_clinc_sized_task():
    rng = random.Random(0)
    labels = [f"i{k}" for k in range(150)] + ["oos"]
    golds = [rng.choice(labels) for _ in range(5500)]
    preds = [g if rng.random() < 0.8 else rng.choice(labels) for g in golds]
    s = per_example_scores("classification", preds, golds, task_name="clinc150")
    start = time.perf_counter()
    ci = bootstrap_ci(s, n_resamples=1000, seed=3)
    assert time.perf_counter() - start < 10
    assert ci == bootstrap_ci(s, n_resamples=1000, seed=3)
    assert set(ci) == {"accuracy", "macro_f1", "invalid_rate", "in_scope_accuracy", "oos_recall"}
