"""Report files, JSON round trip, escaping, and the confusion/error summaries it shows.

`synthetic_results()` is shared with test_report_browser.py and test_verdict.py: three
strategies on four tasks of every kind, scored through TaskResult.from_predictions."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from tasktune.eval.confusion import confusion_matrix, most_confused, per_class, sample_errors, summarize, top_confusions
from tasktune.eval.report import write_report
from tasktune.eval.results import (
    ComparisonResults,
    ForgettingDelta,
    TaskInfo,
    TaskResult,
    TransferMatrix,
)

from synthetic_results import EVIL, synthetic_results  # noqa: E402,F401


@pytest.fixture(scope="module")
def results() -> ComparisonResults:
    return synthetic_results()


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    return write_report(results, tmp_path_factory.mktemp("run"), n_resamples=200)


def test_files_written_and_json_round_trips(results, report):
    assert set(report) == {"html", "json", "markdown"}
    assert report["html"].name == "index.html" and report["html"].parent.name == "report"
    back = ComparisonResults.load(report["json"])
    assert back == results  # dataclass equality: every field, nested, survives JSON
    assert back.strategies["single"].tasks["clinc150"].confusion.top_confusions[0].count >= 1
    assert back.to_json() == results.to_json()


def test_json_has_no_nan_and_rejects_unknown_versions(results):
    r = synthetic_results()
    r.strategies["single"].tasks["circa"].metrics["accuracy"].ci_low = float("nan")
    text = r.to_json()
    assert "NaN" not in text
    assert ComparisonResults.from_json(text).strategies["single"].tasks["circa"].metrics["accuracy"].ci_low is None
    with pytest.raises(ValueError, match="schema version"):
        ComparisonResults.from_dict({**results.to_dict(), "schema_version": 99})


def test_html_is_self_contained_and_escaped(report):
    text = report["html"].read_text()
    assert "<script" not in text.lower()  # the user text arrives escaped, and we add no JS
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert not re.search(r"""(src|href)=["'](?!data:image/png;base64,|#)""", text)  # no external asset
    for section in ("verdict", "metrics", "curves", "transfer", "confusion", "errors", "costs", "forgetting", "environment"):
        assert f'id="{section}"' in text
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(uris) >= 4 + 3 + 1 + 6  # task bars, curves, transfer, confusions (2 tasks x 3)
    assert all(base64.b64decode(u)[:8] == b"\x89PNG\r\n\x1a\n" for u in uris)
    assert "most-confused of 26 classes" in text  # 24 intents + oos + <invalid> -> sub-matrix


def test_markdown_summary(report, results):
    md = report["markdown"].read_text()
    assert md.startswith("# tasktune comparison")
    assert "| clinc150 | accuracy |" in md
    single = results.strategies["single"].tasks["clinc150"].metrics["accuracy"].value
    assert f"{100 * single:.1f}%" in md


def test_from_predictions_matches_metrics_and_counts():
    golds = ["a", "b", "a", "c"]
    preds = ["a", "a", None, "c"]
    tr = TaskResult.from_predictions("classification", preds, golds, inputs=["w", "x", "y", "z"], n_resamples=100)
    assert tr.n == 4 and tr.invalid == 1
    assert tr.metrics["accuracy"].value == pytest.approx(0.5)
    assert tr.metrics["accuracy"].ci_low <= 0.5 <= tr.metrics["accuracy"].ci_high
    assert [x.input for x in tr.errors] == ["x", "y"] and tr.errors[1].predicted is None


def test_confusion_matrix_top_confusions_and_per_class():
    golds = ["transfer"] * 14 + ["balance"] * 5 + ["freeze"] * 3
    preds = ["balance"] * 12 + ["transfer"] * 2 + ["balance"] * 4 + [None] + ["freeze", "transfer", "freeze"]
    labels, m = confusion_matrix(preds, golds, ["transfer", "balance", "freeze"])
    assert labels == ["transfer", "balance", "freeze", "<invalid>"]
    assert m[0].tolist() == [2, 12, 0, 0] and m[1].tolist() == [0, 4, 0, 1] and m[2].tolist() == [1, 0, 2, 0]
    top = top_confusions(labels, m, k=2)
    assert top[0].describe() == "'transfer' predicted as 'balance' 12 times"
    assert top[1].describe() == "'balance' predicted as '<invalid>' 1 time"
    stats = {s.label: s for s in per_class(labels, m)}
    assert "<invalid>" not in stats
    assert stats["balance"].precision == pytest.approx(4 / 16) and stats["balance"].recall == pytest.approx(4 / 5)
    assert stats["transfer"].support == 14
    assert summarize(preds, golds).labels[-1] == "<invalid>"


def test_most_confused_submatrix_keeps_the_confused_classes():
    labels = [f"c{i}" for i in range(150)]
    m = np.diag(np.full(150, 30))
    m[7, 99] = 9
    m[42, 7] = 5
    sub_labels, sub = most_confused(labels, m, k=3)
    assert sub_labels == ["c7", "c42", "c99"]  # the confused classes, in label order
    assert sub.shape == (3, 3) and sub[sub_labels.index("c7"), sub_labels.index("c99")] == 9


def test_error_sample_is_seeded_and_only_errors():
    golds = [str(i % 5) for i in range(100)]
    preds = [g if i % 3 else "x" for i, g in enumerate(golds)]
    a = sample_errors([f"in{i}" for i in range(100)], preds, golds, k=5, seed=3)
    assert a == sample_errors([f"in{i}" for i in range(100)], preds, golds, k=5, seed=3)
    assert a != sample_errors([f"in{i}" for i in range(100)], preds, golds, k=5, seed=4)
    assert all(x.predicted == "x" and int(x.uid) % 3 == 0 for x in a)
    tags = sample_errors([["a", "b"]], [["O", "O"]], [["B-x", "O"]], k=3)
    assert tags[0].input == "a b" and tags[0].expected == "B-x O"


def test_builtin_tasks_primary_metric_is_a_reported_metric():
    from tasktune.eval.metrics import score_task
    from tasktune.tasks.builtin import builtin_tasks

    sample = {"classification": "x", "yesno": "yes", "tagging": ["B-x", "I-x"], "generation": "a summary"}
    for task in builtin_tasks().values():
        info = TaskInfo.from_task(task, golds=[sample[task.kind]], weight=2.0)
        assert info.weight == 2.0 and info.kind == task.kind
        scores = score_task(task.kind, info.golds, info.golds, label_map=info.label_map, task_name=info.name)
        assert scores[info.primary_metric] == 1.0, task.name  # a perfect prediction scores 1


def test_converters_from_transfer_and_forgetting_outputs():
    z = {"a": {"a": 0.1, "b": -0.2}, "b": {"a": 0.3, "b": 0.0}}
    t = TransferMatrix.from_nested(z, "lookahead")
    assert t.tasks == ["a", "b"] and t.values == [[0.1, -0.2], [0.3, 0.0]]
    report = {"clinc150": {"metric": "perplexity", "before": 10.0, "after": 10.5, "delta": 0.5}}
    (f,) = ForgettingDelta.from_report("single", report)
    assert (f.adapter, f.metric, f.delta) == ("clinc150", "perplexity", 0.5)
