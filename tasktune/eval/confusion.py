"""Where a classifier goes wrong: confusion matrix, top confusions in words, per-class
precision/recall, the most-confused sub-matrix of a many-class task, and a seeded
sample of errors.

Invalid outputs (None) get their own predicted column "<invalid>" so that a model that
cannot follow the output format is visible as such, not spread over the classes.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np

from tasktune.eval.results import ClassStats, ConfusionPair, ConfusionSummary, ErrorSample

INVALID = "<invalid>"


def confusion_matrix(
    preds: Sequence[str | None], golds: Sequence[str], labels: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """(labels, matrix [L, L]) with matrix[i, j] = #gold labels[i] predicted labels[j].

    labels: the task's label order; classes seen in the data but missing from it are
    appended sorted, and "<invalid>" last when any prediction is None."""
    order = list(labels or [])
    seen = set(order)
    extra = sorted(({*golds} | {p for p in preds if p is not None}) - seen)
    order += extra
    if any(p is None for p in preds):
        order.append(INVALID)
    index = {c: i for i, c in enumerate(order)}
    m = np.zeros((len(order), len(order)), dtype=np.int64)
    gi = np.array([index[g] for g in golds], dtype=int)
    pi = np.array([index[INVALID if p is None else p] for p in preds], dtype=int)
    np.add.at(m, (gi, pi), 1)
    return order, m


def top_confusions(labels: Sequence[str], matrix: np.ndarray, k: int = 10) -> list[ConfusionPair]:
    """The k largest off-diagonal cells, largest first (ties by label order)."""
    off = np.array(matrix, dtype=np.int64).copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:k]
    pairs = []
    for f in flat:
        i, j = np.unravel_index(f, off.shape)
        if off[i, j] == 0:
            break
        pairs.append(ConfusionPair(gold=labels[i], predicted=labels[j], count=int(off[i, j])))
    return pairs


def per_class(labels: Sequence[str], matrix: np.ndarray) -> list[ClassStats]:
    """Precision, recall, F1 and support per gold class (0 where undefined), from the
    matrix; "<invalid>" is a column, never a class."""
    m = np.asarray(matrix, dtype=float)
    out = []
    for i, label in enumerate(labels):
        if label == INVALID:
            continue
        tp, predicted, support = m[i, i], m[:, i].sum(), m[i, :].sum()
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out.append(ClassStats(label=label, precision=float(p), recall=float(r), f1=float(f1), support=int(support)))
    return out


def most_confused(labels: Sequence[str], matrix: np.ndarray, k: int = 15) -> tuple[list[str], np.ndarray]:
    """Sub-matrix over the k classes with the most errors (row + column off-diagonal
    mass), kept in the original label order - readable for 150-way tasks."""
    m = np.asarray(matrix)
    if len(labels) <= k:
        return list(labels), m
    off = m.copy()
    np.fill_diagonal(off, 0)
    mass = off.sum(0) + off.sum(1)
    keep = np.sort(np.argsort(-mass, kind="stable")[:k])
    return [labels[i] for i in keep], m[np.ix_(keep, keep)]


def summarize(
    preds: Sequence[str | None], golds: Sequence[str], labels: Sequence[str] | None = None, k: int = 10
) -> ConfusionSummary:
    """The results-schema summary: full matrix, top-k confusions, per-class stats."""
    order, m = confusion_matrix(preds, golds, labels)
    return ConfusionSummary(
        labels=order, matrix=m.tolist(), top_confusions=top_confusions(order, m, k), per_class=per_class(order, m)
    )


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def sample_errors(
    inputs: Sequence[Any],
    preds: Sequence[Any],
    golds: Sequence[Any],
    *,
    k: int = 10,
    seed: int = 0,
    wrong: Sequence[bool] | None = None,
    uids: Sequence[str] | None = None,
) -> list[ErrorSample]:
    """Up to k wrong examples, drawn with `random.Random(seed)` and kept in test-set
    order: same inputs + seed -> same sample.

    wrong: which examples count as errors; default prediction != gold (pass e.g.
    ROUGE-L below a threshold for generation tasks). Token lists are joined by spaces."""
    flags = list(wrong) if wrong is not None else [p is None or p != g for p, g in zip(preds, golds)]
    candidates = [i for i, bad in enumerate(flags) if bad]
    chosen = sorted(random.Random(seed).sample(candidates, min(k, len(candidates))))
    return [
        ErrorSample(
            input=_text(inputs[i]),
            expected=_text(golds[i]),
            predicted=None if preds[i] is None else _text(preds[i]),
            uid=str(uids[i]) if uids is not None else str(i),
        )
        for i in chosen
    ]
