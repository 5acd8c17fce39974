"""Bootstrap confidence intervals, paired significance tests and weighted aggregates.

Method. A resample of n test examples is a vector of multinomial counts w (how often
each example was drawn). Every metric in metrics.py is `reduce(w @ stats)`, so B
resamples are one matrix product W [B, n] @ stats [n, d]: means (accuracy, ROUGE) and
corpus metrics (macro-F1, seqeval span F1, ratio metrics such as OOS recall) are all
recomputed exactly on each resample, with the same 1000 resamples by default. Intervals
are percentile intervals (2.5th / 97.5th percentile for 95%), seeded.

Paired bootstrap: both strategies are scored on the *same* resampled examples, so the
difference's interval reflects example-level pairing. Its two-sided p-value inverts the
percentile interval: p = min(1, 2 (1 + min(#{d*_b <= 0}, #{d*_b >= 0})) / (B + 1)), so
"p < 0.05" and "the 95% interval excludes 0" agree (up to the +1 smoothing) and a
report never shows an interval clear of zero next to "not significant". Resamples at
exactly 0 count on both sides (conservative for discrete metrics).

Aggregate across tasks: test sets are independent, so a joint resample draws each task's
examples independently; replicate b of the aggregate is sum_t w_t m_t,b / sum_t w_t
(`weighted_aggregate`, used when per-task replicates are available). When only stored
intervals are known, `propagated_aggregate` uses a normal approximation: se_t =
(hi - lo) / (2 z), se = sqrt(sum w_t^2 se_t^2) / sum w_t.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from tasktune.eval.metrics import ExampleScores, Metric

N_RESAMPLES = 1000
_CHUNK_CELLS = 2_000_000  # resample-weight cells per chunk (B_chunk * n), bounds memory


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile confidence interval."""

    value: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class PairedResult:
    """metric(A) - metric(B) on the same examples, its CI and two-sided p-value."""

    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    n_resamples: int

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def resample_weights(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Multinomial resample counts in chunks: yields W [b, n] (float64), sum of b = n_resamples.
    Same seed -> same resamples, so two callers with the same seed are paired."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, _CHUNK_CELLS // max(n, 1)))
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(b, n))
        flat = (idx + (np.arange(b) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        done += b


def replicates(scores: ExampleScores, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    """Bootstrap replicates of every metric: {metric: [n_resamples]}."""
    out: dict[str, list[np.ndarray]] = {m: [] for m in scores.metrics}
    if scores.n == 0:
        return {m: np.full(n_resamples, np.nan) for m in scores.metrics}
    for w in resample_weights(scores.n, n_resamples, seed):
        sums = {name: w @ t for name, t in scores.tables.items()}  # [b, n] @ [n, d] -> [b, d]
        for m, v in scores.reduce(sums).items():
            out[m].append(v)
    return {m: np.concatenate(v) for m, v in out.items()}


def percentile_ci(reps: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(reps, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi))


def bootstrap_ci(
    scores: ExampleScores, n_resamples: int = N_RESAMPLES, seed: int = 0, alpha: float = 0.05
) -> dict[str, Interval]:
    """Point estimate and (1 - alpha) percentile interval for every metric of a task."""
    point = scores.point()
    reps = replicates(scores, n_resamples, seed)
    return {m: Interval(point[m], *percentile_ci(reps[m], alpha)) for m in scores.metrics}


def _paired(point_diff: float, reps_diff: np.ndarray, n: int, alpha: float) -> PairedResult:
    finite = reps_diff[np.isfinite(reps_diff)]
    lo, hi = percentile_ci(finite, alpha)
    tail = min(np.sum(finite <= 0), np.sum(finite >= 0))
    p = float(2 * (1 + tail) / (1 + finite.size))
    return PairedResult(point_diff, lo, hi, min(p, 1.0), n, int(finite.size))


def paired_bootstrap(
    metric_fn: Metric | Callable[[Sequence[Any], Sequence[Any]], float],
    preds_a: Sequence[Any],
    preds_b: Sequence[Any],
    golds: Sequence[Any],
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    alpha: float = 0.05,
) -> PairedResult:
    """Does A beat B on this task? metric(A) - metric(B) with a paired-bootstrap CI and p.

    metric_fn: a metrics.Metric (vectorised: one matmul for all resamples), or any
    callable (preds, golds) -> float, which is then called twice per resample (slow;
    pass fewer resamples for expensive ones)."""
    n = len(golds)
    if not (len(preds_a) == len(preds_b) == n):
        raise ValueError(f"paired bootstrap needs equal lengths, got {len(preds_a)}, {len(preds_b)}, {n}")
    if isinstance(metric_fn, Metric):
        a, b = metric_fn.scores(preds_a, golds), metric_fn.scores(preds_b, golds)
        return paired_from_scores(a, b, metric_fn.name, n_resamples=n_resamples, seed=seed, alpha=alpha)
    point = metric_fn(preds_a, golds) - metric_fn(preds_b, golds)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_resamples)
    for i in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        g = [golds[j] for j in idx]
        diffs[i] = metric_fn([preds_a[j] for j in idx], g) - metric_fn([preds_b[j] for j in idx], g)
    return _paired(float(point), diffs, n, alpha)


def paired_from_scores(
    a: ExampleScores, b: ExampleScores, metric: str, *, n_resamples: int = N_RESAMPLES, seed: int = 0, alpha: float = 0.05
) -> PairedResult:
    """Paired bootstrap of `metric` from two strategies' per-example statistics on the
    same test examples (same seed -> same resamples for both)."""
    if a.n != b.n:
        raise ValueError(f"paired bootstrap needs the same examples, got {a.n} and {b.n}")
    point = a.point()[metric] - b.point()[metric]
    diff = replicates(a, n_resamples, seed)[metric] - replicates(b, n_resamples, seed)[metric]
    return _paired(point, diff, a.n, alpha)


def weighted_aggregate(
    points: Mapping[str, float], reps: Mapping[str, np.ndarray], weights: Mapping[str, float], alpha: float = 0.05
) -> tuple[Interval, np.ndarray]:
    """Weighted mean of per-task metrics with a joint-resampling CI.

    points: task -> value; reps: task -> [B] replicates (each task resampled on its own
    test set, all with the same B); weights: task -> weight (missing = 1). Returns the
    interval and the aggregate's replicates (to difference two strategies pairwise)."""
    tasks = list(points)
    w = np.array([weights.get(t, 1.0) for t in tasks], dtype=float)
    if w.sum() <= 0:
        raise ValueError("aggregate weights must sum to a positive number")
    value = float(np.dot(w, [points[t] for t in tasks]) / w.sum())
    agg = np.tensordot(w, np.stack([reps[t] for t in tasks]), axes=1) / w.sum()  # [T] . [T, B] -> [B]
    return Interval(value, *percentile_ci(agg, alpha)), agg


def propagated_aggregate(
    intervals: Mapping[str, Interval], weights: Mapping[str, float], alpha: float = 0.05
) -> Interval:
    """Weighted mean with a CI propagated from per-task intervals (normal approximation,
    independent tasks); used when per-task replicates were not kept."""
    tasks = list(intervals)
    w = np.array([weights.get(t, 1.0) for t in tasks], dtype=float)
    z = NormalDist().inv_cdf(1 - alpha / 2)
    vals = np.array([intervals[t].value for t in tasks], dtype=float)
    se = np.array([(intervals[t].ci_high - intervals[t].ci_low) / (2 * z) for t in tasks], dtype=float)
    value = float(np.dot(w, vals) / w.sum())
    se_agg = float(np.sqrt(np.dot(w**2, np.nan_to_num(se) ** 2)) / w.sum())
    return Interval(value, value - z * se_agg, value + z * se_agg)
