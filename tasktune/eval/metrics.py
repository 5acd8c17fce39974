"""Task metrics as functions of summed per-example statistics.

Every metric here - accuracy, macro-F1, exact-span slot F1, ROUGE, the CLINC150 scope
metrics - is written as `reduce(sum over examples of a per-example statistic vector)`:

- accuracy: stats [correct, 1] -> sum[0] / sum[1];
- slot P/R/F1 (seqeval micro average): stats [tp spans, predicted spans, gold spans];
- macro-F1: stats [tp_k, predicted_k, gold_k] for every class k, one-hot per example;
- ROUGE: stats [best rouge1, best rouge2, best rougeL, 1] (means).

Why: one representation serves the point estimate (sum with weight 1 per example) and
the bootstrap (sum with multinomial resample weights, a matrix product; see
bootstrap.py). Corpus metrics such as macro-F1 are then *recomputed exactly* on every
resample at the cost of a matmul, with no Python loop and no cut in resamples.

Predictions arrive already parsed; `None` is an invalid output and is always wrong
(for tagging it predicts no spans; a tag list whose length differs from the gold's is
invalid too). Metric values are fractions in [0, 1]; all are higher-is-better except
`invalid_rate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

OOS_LABEL = "oos"  # CLINC150's out-of-scope label (Larson et al. 2019)
LOWER_IS_BETTER = frozenset({"invalid_rate"})
PRIMARY_METRIC = {"classification": "accuracy", "tagging": "slot_f1", "generation": "rougeL", "yesno": "accuracy"}
# Task.metric spellings -> the metric name score_task reports
METRIC_ALIASES = {"rouge": "rougeL", "rouge_l": "rougeL", "rougel": "rougeL", "f1": "slot_f1", "acc": "accuracy"}



def primary_metric(kind: str, metric: str | None = None) -> str:
    """The score_task key for a task's declared metric (Task.metric), or the kind's
    default when none is declared: e.g. ("generation", "rouge") -> "rougeL"."""
    if not metric:
        return PRIMARY_METRIC[kind]
    return METRIC_ALIASES.get(metric.lower(), metric)


Reducer = Callable[[np.ndarray], np.ndarray]  # summed stats [..., d] -> metric [...]


@dataclass
class ExampleScores:
    """Per-example statistics of one task's predictions, ready for point estimates and
    resampling.

    tables: table name -> [n, d] per-example statistics (float64).
    metrics: metric name -> (table name, reducer over the table's column sums).
    """

    n: int
    tables: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, tuple[str, Reducer]] = field(default_factory=dict)
    means: dict[str, tuple[int, int]] = field(default_factory=dict)  # mean-type metric -> (num, den) columns

    def reduce(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Metric values from per-table sums ([..., d] each) -> {metric: [...]}."""
        return {name: reducer(sums[table]) for name, (table, reducer) in self.metrics.items()}

    def point(self) -> dict[str, float]:
        """The metrics on the whole test set (every example weighted 1)."""
        sums = {name: t.sum(axis=0) for name, t in self.tables.items()}
        return {k: float(v) for k, v in self.reduce(sums).items()}

    def per_example(self, metric: str) -> np.ndarray:
        """Per-example values of a mean-type metric (numerator / denominator column),
        e.g. 0/1 correctness for accuracy, the best ROUGE-L for rougeL. Examples outside
        a sub-population (in-scope accuracy on an OOS query) are NaN."""
        table, _ = self.metrics[metric]
        t = self.tables[table]
        col = self.means.get(metric)
        if col is None:
            raise ValueError(f"'{metric}' is a corpus metric; it has no per-example value")
        num, den = t[:, col[0]], t[:, col[1]]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    """num / den elementwise, `empty` where den == 0 (undefined or 0 by convention)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), empty)


def _mean_metric(scores: ExampleScores, name: str, table: str, num_col: int, den_col: int, empty=np.nan) -> None:
    scores.metrics[name] = (table, lambda s: _ratio(s[..., num_col], s[..., den_col], empty))
    scores.means[name] = (num_col, den_col)


# --- plain metrics (one number; convenient and used as references in tests) -------------


def invalid_rate(preds: Sequence[Any]) -> float:
    """Fraction of outputs the parser could not read (None)."""
    return sum(p is None for p in preds) / len(preds) if preds else 0.0


def accuracy(preds: Sequence[str | None], golds: Sequence[str]) -> float:
    return float(np.mean([p is not None and p == g for p, g in zip(preds, golds)])) if golds else float("nan")


def relax(values: Sequence[str | None], label_map: dict[str, str]) -> list[str | None]:
    """Map labels to the relaxed label set; labels without an entry stay themselves."""
    return [None if v is None else label_map.get(v, v) for v in values]


# --- per-example statistics per task kind ----------------------------------------------


def _class_tables(scores: ExampleScores, preds: Sequence[str | None], golds: Sequence[str], prefix: str = "") -> None:
    """accuracy and macro-F1 over classes present in gold or (valid) predictions - the
    label set sklearn uses by default; invalid outputs count against the gold class's
    recall but add no class of their own."""
    n = len(golds)
    correct = np.array([p is not None and p == g for p, g in zip(preds, golds)], dtype=float)
    scores.tables[prefix + "acc"] = np.stack([correct, np.ones(n)], axis=1)
    _mean_metric(scores, prefix + "accuracy", prefix + "acc", 0, 1)

    classes = sorted(set(golds) | {p for p in preds if p is not None})
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    onehot = np.zeros((n, 3 * k))
    rows = np.arange(n)
    gold_idx = np.array([index[g] for g in golds], dtype=int)
    onehot[rows, 2 * k + gold_idx] = 1.0  # gold_k
    valid = np.array([p is not None for p in preds])
    pred_idx = np.array([index[p] if p is not None else 0 for p in preds], dtype=int)
    onehot[rows[valid], k + pred_idx[valid]] = 1.0  # predicted_k
    onehot[rows[correct > 0], gold_idx[correct > 0]] = 1.0  # tp_k
    scores.tables[prefix + "classes"] = onehot

    def macro_f1(s: np.ndarray) -> np.ndarray:
        tp, pc, gc = s[..., :k], s[..., k : 2 * k], s[..., 2 * k :]
        present = (pc + gc) > 0
        f1 = _ratio(2 * tp, pc + gc, 0.0)
        return _ratio((f1 * present).sum(-1), present.sum(-1), np.nan)

    scores.metrics[prefix + "macro_f1"] = (prefix + "classes", macro_f1)


def _classification(scores: ExampleScores, preds, golds, task_name: str | None) -> None:
    _class_tables(scores, preds, golds)
    if OOS_LABEL in set(golds) or (task_name or "").lower().startswith("clinc"):
        # Larson et al. 2019: in-scope accuracy over in-scope test queries; OOS recall =
        # share of OOS queries predicted OOS.
        in_scope = np.array([g != OOS_LABEL for g in golds], dtype=float)
        correct = np.array([p is not None and p == g for p, g in zip(preds, golds)], dtype=float)
        is_oos = 1.0 - in_scope
        hit_oos = np.array([p == OOS_LABEL for p in preds], dtype=float) * is_oos
        scores.tables["scope"] = np.stack([correct * in_scope, in_scope, hit_oos, is_oos], axis=1)
        _mean_metric(scores, "in_scope_accuracy", "scope", 0, 1)
        _mean_metric(scores, "oos_recall", "scope", 2, 3)


def _yesno(scores: ExampleScores, preds, golds, label_map: dict[str, str] | None) -> None:
    _class_tables(scores, preds, golds)
    if label_map:
        _class_tables(scores, relax(preds, label_map), relax(golds, label_map), prefix="relaxed_")


def spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Exact spans (type, start, end inclusive) of a BIO/IOB2 tag list, as seqeval's
    default (conlleval) mode reads them."""
    from seqeval.metrics.sequence_labeling import get_entities

    return set(get_entities(list(tags)))


def _tagging(scores: ExampleScores, preds, golds) -> None:
    rows = []
    for p, g in zip(preds, golds):
        gold_spans = spans(g)
        pred_spans = spans(p) if p is not None and len(p) == len(g) else set()
        rows.append((len(pred_spans & gold_spans), len(pred_spans), len(gold_spans)))
    t = np.array(rows, dtype=float).reshape(-1, 3)
    scores.tables["spans"] = t
    scores.metrics["slot_precision"] = ("spans", lambda s: _ratio(s[..., 0], s[..., 1], 0.0))
    scores.metrics["slot_recall"] = ("spans", lambda s: _ratio(s[..., 0], s[..., 2], 0.0))
    scores.metrics["slot_f1"] = ("spans", lambda s: _ratio(2 * s[..., 0], s[..., 1] + s[..., 2], 0.0))


_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_best(pred: str | None, references: Sequence[str], scorer=None) -> tuple[float, float, float]:
    """ROUGE-1/2/L F-measure of one prediction, each the best over the references
    (rouge-score's `score_multi`), stemming on. An invalid output scores 0."""
    if pred is None:
        return (0.0, 0.0, 0.0)
    if scorer is None:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)
    result = scorer.score_multi(list(references), pred)
    return tuple(result[t].fmeasure for t in _ROUGE_TYPES)  # type: ignore[return-value]


def _generation(scores: ExampleScores, preds, golds) -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)
    rows = []
    for p, g in zip(preds, golds):
        refs = [g] if isinstance(g, str) else list(g)
        rows.append((*rouge_best(p, refs, scorer), 1.0))
    scores.tables["rouge"] = np.array(rows, dtype=float).reshape(-1, 4)
    for i, name in enumerate(_ROUGE_TYPES):
        _mean_metric(scores, name, "rouge", i, 3)


def per_example_scores(
    kind: str,
    preds: Sequence[Any],
    golds: Sequence[Any],
    *,
    labels: Sequence[str] | None = None,
    label_map: dict[str, str] | None = None,
    task_name: str | None = None,
) -> ExampleScores:
    """Per-example statistics for every metric of a task kind (see module docstring).

    golds: labels (classification, yesno), BIO tag lists (tagging), or a reference
    string / list of references per example (generation). `labels` is accepted for a
    uniform signature; macro-F1 averages over the classes present in gold or predictions.
    """
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} gold values")
    n = len(golds)
    scores = ExampleScores(n=n)
    invalid = np.array([p is None for p in preds], dtype=float)
    if kind == "tagging":  # a tag list that does not align with the tokens is invalid too
        invalid = np.array([p is None or len(p) != len(g) for p, g in zip(preds, golds)], dtype=float)
    scores.tables["invalid"] = np.stack([invalid, np.ones(n)], axis=1).reshape(n, 2)
    _mean_metric(scores, "invalid_rate", "invalid", 0, 1, empty=0.0)
    if kind == "classification":
        _classification(scores, preds, golds, task_name)
    elif kind == "yesno":
        _yesno(scores, preds, golds, label_map)
    elif kind == "tagging":
        _tagging(scores, preds, golds)
    elif kind == "generation":
        _generation(scores, preds, golds)
    else:
        raise ValueError(f"unknown task kind '{kind}' (expected classification, tagging, generation, yesno)")
    return scores


def score_task(
    kind: str,
    preds: Sequence[Any],
    golds: Sequence[Any],
    *,
    labels: Sequence[str] | None = None,
    label_map: dict[str, str] | None = None,
    task_name: str | None = None,
) -> dict[str, float]:
    """Every metric of a task kind on the whole test set: {name: value in [0, 1]}."""
    return per_example_scores(kind, preds, golds, labels=labels, label_map=label_map, task_name=task_name).point()


@dataclass(frozen=True)
class Metric:
    """One named metric of a task kind, callable as `metric(preds, golds) -> float`.
    bootstrap.paired_bootstrap recognises it and resamples its statistics in one
    vectorised pass instead of calling it once per resample."""

    kind: str
    name: str
    label_map: dict[str, str] | None = None
    task_name: str | None = None

    def scores(self, preds: Sequence[Any], golds: Sequence[Any]) -> ExampleScores:
        s = per_example_scores(self.kind, preds, golds, label_map=self.label_map, task_name=self.task_name)
        if self.name not in s.metrics:
            raise KeyError(f"task kind '{self.kind}' has no metric '{self.name}' (has {sorted(s.metrics)})")
        table = s.metrics[self.name][0]
        means = {self.name: s.means[self.name]} if self.name in s.means else {}
        return ExampleScores(s.n, {table: s.tables[table]}, {self.name: s.metrics[self.name]}, means)

    def __call__(self, preds: Sequence[Any], golds: Sequence[Any]) -> float:
        return self.scores(preds, golds).point()[self.name]
