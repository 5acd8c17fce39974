"""Readers: records with their physical line numbers; bad rows as RowIssues, not exceptions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasktune.data.readers import file_format, read_file, read_hf
from tasktune.errors import RowIssue, TasktuneError

FIX = Path(__file__).parent / "fixtures"


def rows(stream):
    return list(stream.rows)


def test_jsonl_lines_are_physical_and_blank_lines_count():
    got = rows(read_file(FIX / "good" / "intent.jsonl"))
    assert [line for line, _ in got] == [1, 2, 4, 5]  # line 3 is blank
    assert got[2][1] == {"text": "set the heating to 21 degrees", "intent": "set_thermostat"}


def test_csv_header_is_line_one_and_quoted_newlines_keep_the_row_start():
    got = rows(read_file(FIX / "good" / "intent.csv"))
    assert [line for line, _ in got] == [2, 3, 4, 6]
    assert got[1][1]["text"] == "switch off the bedroom lamp, please"
    assert got[2][1] == {"text": "a request\nover two lines", "intent": "set_thermostat"}


def test_tsv_from_suffix():
    got = rows(read_file(FIX / "good" / "intent.tsv"))
    assert [line for line, _ in got] == [2, 3, 4]
    assert got[0][1] == {"text": "turn on the kitchen lights", "intent": "lights_on"}


def test_format_option_overrides_the_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("text\tintent\nhello there\tgreet\n")
    with pytest.raises(TasktuneError, match="format"):
        read_file(path)
    assert rows(read_file(path, "tsv")) == [(2, {"text": "hello there", "intent": "greet"})]
    assert file_format("x.JSONL") == "jsonl"
    with pytest.raises(TasktuneError, match="unknown format 'xml'"):
        file_format("x.jsonl", "xml")


def test_bad_json_is_an_issue_on_its_line_and_reading_goes_on():
    got = rows(read_file(FIX / "bad" / "bad_json.jsonl"))
    assert [line for line, _ in got] == [1, 2, 3, 4]
    issue = got[2][1]
    assert isinstance(issue, RowIssue) and issue.line == 3 and issue.field == "json"
    assert "bad_json.jsonl:3" in str(issue)
    assert isinstance(got[3][1], dict)


def test_json_that_is_not_an_object_is_an_issue(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": "b"}\n["not", "an", "object"]\n')
    got = rows(read_file(path))
    assert isinstance(got[1][1], RowIssue) and "expected a JSON object, got list" in got[1][1].message


def test_csv_row_with_wrong_field_count_is_an_issue():
    got = rows(read_file(FIX / "bad" / "bad_row.csv"))
    issues = [item for _, item in got if isinstance(item, RowIssue)]
    assert [(i.line, i.field) for i in issues] == [(3, "")]
    assert "expected 2 fields (as in the header), found 3" in issues[0].message
    assert [line for line, item in got if isinstance(item, dict)] == [2, 4]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(TasktuneError, match="nope.jsonl: data file not found"):
        read_file(tmp_path / "nope.jsonl")


def test_hf_saved_dataset_folder(tmp_path):
    import datasets

    records = [{"text": "hi", "intent": "greet"}, {"text": "bye", "intent": "leave"}]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(records),
        "validation": datasets.Dataset.from_list(records[:1]),
    }).save_to_disk(str(tmp_path / "ds"))
    stream = read_hf(str(tmp_path / "ds"), "train")
    assert rows(stream) == [(1, records[0]), (2, records[1])]
    assert rows(read_hf(str(tmp_path / "ds"), "validation")) == [(1, records[0])]
    assert read_hf(str(tmp_path / "ds"), "test") is None  # absent, not an error
    with pytest.raises(TasktuneError, match="no split 'dev'"):
        read_hf(str(tmp_path / "ds"), "validation", "dev")


def test_hf_single_dataset_saved_to_disk_is_the_train_split(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "hi", "intent": "greet"}]).save_to_disk(str(tmp_path / "one"))
    assert rows(read_hf(str(tmp_path / "one"), "train")) == [(1, {"text": "hi", "intent": "greet"})]


def test_hf_folder_of_jsonl_files_with_split_aliases(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "a", "intent": "x"}) + "\n")
    (tmp_path / "dev.jsonl").write_text(json.dumps({"text": "b", "intent": "y"}) + "\n")
    assert rows(read_hf(str(tmp_path), "train")) == [(1, {"text": "a", "intent": "x"})]
    stream = read_hf(str(tmp_path), "validation")
    assert stream.path.endswith("dev.jsonl") and rows(stream) == [(1, {"text": "b", "intent": "y"})]
    assert read_hf(str(tmp_path), "test") is None


def test_hub_name_offline_fails_with_its_name():
    with pytest.raises(TasktuneError, match="cannot load Hugging Face dataset 'no-such-owner/no-such-dataset'"):
        read_hf("no-such-owner/no-such-dataset", "train")
