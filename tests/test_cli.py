"""The command line as a user meets it: counts, clear errors, skip-invalid summaries."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from tasktune.cli import app

ROOT = Path(__file__).resolve().parent.parent
BAD = Path(__file__).resolve().parent / "fixtures" / "bad" / "bad_json.jsonl"
cli = CliRunner()


def _broken_project(tmp_path: Path) -> Path:
    raw = {
        "model": "minilm",
        "tasks": [{"name": "home", "kind": "classification", "path": str(BAD), "input": "text", "target": "intent"}],
    }
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_data_stats_json_reports_the_bundled_counts():
    result = cli.invoke(app, ["data", "stats", str(ROOT / "examples" / "du.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["tasks"]
    clinc = stats["clinc150"]["splits"]["train"]
    assert (clinc["records"], clinc["in_scope"], clinc["out_of_scope"]) == (15100, 15000, 100)
    snips = stats["snips_intent"]["splits"]
    assert [snips[s]["records"] for s in ("train", "validation", "test")] == [13084, 700, 700]
    dialog = stats["dialogsum"]["splits"]
    assert (dialog["train"]["records"], dialog["test"]["records"]) == (500, 500)
    assert abs(sum(t["mixing_rate"] for t in stats.values()) - 1.0) < 1e-9
    assert clinc["tokens"]["max"] >= clinc["tokens"]["p50"] > 0


def test_broken_line_3_names_file_and_line_and_exits_non_zero(tmp_path):
    result = cli.invoke(app, ["data", "stats", str(_broken_project(tmp_path)), "--json"])
    assert result.exit_code == 2
    assert "bad_json.jsonl:3" in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_skip_invalid_reports_exactly_the_bad_rows(tmp_path):
    result = cli.invoke(app, ["data", "stats", str(_broken_project(tmp_path)), "--json", "--skip-invalid"])
    assert result.exit_code == 0, result.output
    train = json.loads(result.stdout)["tasks"]["home"]["splits"]["train"]
    assert train["records"] == 3 and train["skipped"] == 1
    assert len(train["skipped_rows"]) == 1 and "bad_json.jsonl:3" in train["skipped_rows"][0]


def test_config_error_names_file_line_and_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model: minilm\ntasks:\n  - builtin: clinc150\n    max_exampels: 10\n")
    result = cli.invoke(app, ["data", "stats", str(path)])
    assert result.exit_code == 2
    assert "typo.yaml:4" in result.stderr and "max_exampels" in result.stderr


def test_preview_shows_rendered_prompt_and_target():
    result = cli.invoke(app, ["data", "preview", str(ROOT / "examples" / "du.yaml"), "--task", "snips_slots", "-n", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.count("prompt") >= 2 and "target" in result.output
