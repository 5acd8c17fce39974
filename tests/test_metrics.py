"""Metrics against hand-computed values and the reference libraries (scikit-learn,
seqeval, rouge-score)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from rouge_score import rouge_scorer
from seqeval.metrics import f1_score as seq_f1
from seqeval.metrics import precision_score as seq_p
from seqeval.metrics import recall_score as seq_r
from sklearn.metrics import f1_score

from tasktune.eval.metrics import Metric, per_example_scores, score_task


def test_classification_hand_computed():
    golds = ["a", "a", "b", "b", "c"]
    preds = ["a", "b", "b", None, "c"]
    m = score_task("classification", preds, golds)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["invalid_rate"] == pytest.approx(1 / 5)
    # a: P 1/1 R 1/2 F 2/3; b: P 1/2 R 1/2 F 1/2; c: F 1 -> macro (2/3 + 1/2 + 1) / 3
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_macro_f1_matches_sklearn_on_random_data():
    rng = random.Random(1)
    labels = [f"l{i}" for i in range(12)]
    golds = [rng.choice(labels[:10]) for _ in range(300)]
    preds = [None if rng.random() < 0.1 else (g if rng.random() < 0.6 else rng.choice(labels)) for g in golds]
    m = score_task("classification", preds, golds)
    valid = sorted(set(golds) | {p for p in preds if p is not None})
    ref = f1_score(golds, [p if p is not None else "<invalid>" for p in preds], labels=valid, average="macro", zero_division=0)
    assert m["macro_f1"] == pytest.approx(ref)
    assert m["accuracy"] == pytest.approx(np.mean([p == g for p, g in zip(preds, golds)]))


def test_clinc_in_scope_accuracy_and_oos_recall():
    golds = ["transfer", "balance", "oos", "oos", "oos", "transfer"]
    preds = ["transfer", "oos", "oos", "balance", None, "transfer"]
    m = score_task("classification", preds, golds, task_name="clinc150")
    assert m["in_scope_accuracy"] == pytest.approx(2 / 3)  # 3 in-scope queries, 2 right
    assert m["oos_recall"] == pytest.approx(1 / 3)  # 3 oos queries, 1 predicted oos
    assert m["accuracy"] == pytest.approx(3 / 6)
    # no oos label and not clinc -> no scope metrics
    assert "oos_recall" not in score_task("classification", ["a"], ["a"], task_name="snips_intent")


def test_tagging_matches_seqeval_exact_spans():
    golds = [["B-city", "I-city", "O", "B-date"], ["O", "B-artist", "I-artist", "O"], ["B-x", "O"]]
    preds = [["B-city", "O", "O", "B-date"], ["O", "B-artist", "I-artist", "O"], None]
    m = score_task("tagging", preds, golds)
    # gold spans 4, predicted spans: city(0,0) wrong boundary, date ok, artist ok -> 3; tp 2
    assert m["slot_precision"] == pytest.approx(2 / 3)
    assert m["slot_recall"] == pytest.approx(2 / 4)
    assert m["slot_f1"] == pytest.approx(2 * 2 / (3 + 4))
    ref_preds = [p if p is not None else ["O"] * len(g) for p, g in zip(preds, golds)]
    assert m["slot_f1"] == pytest.approx(seq_f1(golds, ref_preds))
    assert m["slot_precision"] == pytest.approx(seq_p(golds, ref_preds))
    assert m["slot_recall"] == pytest.approx(seq_r(golds, ref_preds))
    assert m["invalid_rate"] == pytest.approx(1 / 3)


def test_tagging_length_mismatch_is_invalid_and_predicts_nothing():
    m = score_task("tagging", [["B-x"]], [["B-x", "O"]])
    assert m["invalid_rate"] == 1.0 and m["slot_recall"] == 0.0


def test_rouge_best_of_references():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pred = "the cat sat on the mat"
    refs = ["a dog barked loudly", "the cats sat on a mat"]
    m = score_task("generation", [pred, None], [refs, "anything"])
    best = max(scorer.score(r, pred)["rougeL"].fmeasure for r in refs)
    assert best == scorer.score(refs[1], pred)["rougeL"].fmeasure  # the second ref is the match
    assert m["rougeL"] == pytest.approx(best / 2)  # the invalid output scores 0
    single = score_task("generation", [pred], [refs[0]])
    assert single["rouge1"] < score_task("generation", [pred], [refs])["rouge1"]
    # stemming: "cats" matches "cat"
    assert score_task("generation", ["cats"], ["cat"])["rouge1"] == pytest.approx(1.0)


def test_yesno_strict_vs_relaxed():
    label_map = {"Yes": "Yes", "Probably yes / sometimes yes": "Yes", "No": "No", "Probably no": "No"}
    golds = ["Yes", "Probably yes / sometimes yes", "No", "Probably no"]
    preds = ["Probably yes / sometimes yes", "Yes", "No", None]
    m = score_task("yesno", preds, golds, label_map=label_map)
    assert m["accuracy"] == pytest.approx(1 / 4)
    assert m["relaxed_accuracy"] == pytest.approx(3 / 4)  # None stays wrong
    assert "relaxed_accuracy" not in score_task("yesno", preds, golds)


def test_per_example_values_and_metric_object():
    s = per_example_scores("classification", ["a", "b", "oos"], ["a", "oos", "c"], task_name="clinc150")
    np.testing.assert_array_equal(s.per_example("accuracy"), [1, 0, 0])
    in_scope = s.per_example("in_scope_accuracy")
    assert in_scope[0] == 1 and np.isnan(in_scope[1]) and in_scope[2] == 0
    with pytest.raises(ValueError):
        s.per_example("macro_f1")
    assert Metric("classification", "macro_f1")(["a", "b"], ["a", "a"]) == pytest.approx(
        f1_score(["a", "a"], ["a", "b"], average="macro", zero_division=0)
    )


def test_rejects_mismatched_lengths_and_unknown_kind():
    with pytest.raises(ValueError):
        score_task("classification", ["a"], ["a", "b"])
    with pytest.raises(ValueError):
        score_task("regression", ["a"], ["a"])
