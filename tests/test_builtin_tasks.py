"""Built-in tasks on the bundled data, the registry, and tasks built from config."""

from __future__ import annotations

import json
from collections import Counter
from functools import cache
from pathlib import Path

import pytest

from tasktune.config import config_from_dict, load_config
from tasktune.data.load import load_project, load_split, load_tasks, subset
from tasktune.errors import ConfigError
from tasktune.tasks.builtin import CIRCA_RELAXED
from tasktune.tasks.from_config import build_tasks
from tasktune.tasks.registry import builtin_task_names, get_task, register_task
from tasktune.tasks.spec import DataSource, Task, Template

ROOT = Path(__file__).parent.parent
FIX = Path(__file__).parent / "fixtures"


@cache
def bundled():
    return load_tasks([get_task(name) for name in builtin_task_names()])


def counts(name):
    return {split: len(part.examples) for split, part in bundled()[name].items()}


def test_builtin_names():
    assert builtin_task_names() == ("clinc150", "snips_intent", "snips_slots", "dialogsum", "circa")


def test_clinc150_counts_and_labels():
    assert counts("clinc150") == {"train": 15_100, "validation": 3_100, "test": 5_500}
    task = get_task("clinc150")
    assert len(task.labels) == 151 and task.labels[-1] == "oos" and task.kind == "classification"
    oos = Counter(ex.target for ex in bundled()["clinc150"]["test"].examples)["oos"]
    assert oos == 1_000
    first = bundled()["clinc150"]["train"].examples[0]
    assert first.target == "translate"
    raw = (ROOT / "tasktune/resources/data/clinc150/data_full.json").read_text().splitlines()
    for ex in bundled()["clinc150"]["train"].examples[::997]:  # origin = the utterance's line in the JSON
        assert json.loads(raw[ex.origin.line - 1].strip().rstrip(",")) == ex.inputs["text"], ex.origin
        assert json.loads(raw[ex.origin.line]) == ex.target


def test_snips_counts_and_shapes():
    assert counts("snips_intent") == counts("snips_slots") == {"train": 13_084, "validation": 700, "test": 700}
    assert len(get_task("snips_intent").labels) == 7
    slots = get_task("snips_slots")
    assert slots.kind == "tagging" and len(slots.labels) == 39
    assert not any(s.startswith(("B-", "I-")) for s in slots.labels)
    ex = bundled()["snips_slots"]["train"].examples[0]
    assert ex.inputs["tokens"][:3] == ["listen", "to", "westbam"] and len(ex.target) == len(ex.inputs["tokens"])


def test_dialogsum_train_is_the_dev_file_and_test_has_three_references():
    assert counts("dialogsum") == {"train": 500, "test": 500}
    assert "no validation split" in get_task("dialogsum").description
    test = bundled()["dialogsum"]["test"].examples
    assert all(len(ex.references) == 3 and ex.references[0] == ex.target for ex in test)
    assert all(ex.references == () for ex in bundled()["dialogsum"]["train"].examples)


def test_circa_counts_labels_and_excluded_rows():
    parts = bundled()["circa"]
    # 3,427 rows per file; rows without a strict label are excluded and counted, not dropped
    assert {s: (len(p.examples), len(p.excluded)) for s, p in parts.items()} == {
        "train": (3127, 300), "validation": (3139, 288), "test": (3141, 286)}
    task = get_task("circa")
    assert set(ex.target for ex in parts["train"].examples) == set(task.labels)
    assert task.label_map["probably-yes"] == "yes" and task.label_map["not-sure"] == "other"
    assert set(task.label_map.values()) == {"yes", "no", "yes-upon-condition", "in-the-middle", "other"}
    assert task.label_map == CIRCA_RELAXED


def test_user_circa_tsv_loads_as_a_yesno_task():
    cfg = config_from_dict({"tasks": [{"builtin": "circa", "name": "my_circa", "path": str(FIX / "circa_synthetic.tsv"),
                                       "eval_path": str(FIX / "circa_synthetic.tsv")}]})
    (task,) = build_tasks(cfg)
    assert task.kind == "yesno" and task.name == "my_circa"
    loaded = load_tasks([task])["my_circa"]
    assert list(loaded) == ["train", "test"]
    targets = [ex.target for ex in loaded["train"].examples]
    assert targets == ["yes", "no", "probably-yes", "yes-upon-condition", "not-sure", "in-the-middle",
                       "probably-no", "other"]
    assert loaded["train"].examples[0].inputs["question"] == "Are you coming to the party tonight?"


def test_every_builtin_has_three_templates_that_format():
    for name in builtin_task_names():
        task = get_task(name)
        assert len(task.templates) >= 3, name
        assert len({t.prompt for t in task.templates}) == len(task.templates)


def test_template_choice_is_deterministic_and_uses_every_template():
    task = get_task("snips_intent")
    examples = bundled()["snips_intent"]["validation"].examples
    first = [task.template_for(ex, 7) for ex in examples]
    assert first == [task.template_for(ex, 7) for ex in reversed(examples)][::-1]
    assert set(first) == set(range(len(task.templates)))
    other_seed = [task.template_for(ex, 8) for ex in examples]
    assert first != other_seed


def test_registry_unknown_name_lists_known_and_register_works():
    with pytest.raises(ConfigError, match="known tasks: .*circa.*clinc150"):
        get_task("nope")
    mine = Task(name="toy_registered", kind="generation", source=DataSource(kind="file", paths={"train": "x.jsonl"}),
                input_fields=("text",), target_field="out", templates=(Template("{text}"),), metric="rouge")
    register_task(mine)
    assert get_task("toy_registered") is mine
    register_task(mine)  # the same task again is fine
    with pytest.raises(ConfigError, match="already registered"):
        register_task(Task(**{**mine.__dict__, "metric": "exact"}))
    (built,) = build_tasks(config_from_dict({"tasks": [{"builtin": "toy_registered"}]}))
    assert built == mine


def test_unknown_builtin_in_config_lists_known_names():
    with pytest.raises(ConfigError, match="unknown builtin task 'clinc151'; known: .*clinc150.*snips_slots"):
        build_tasks(config_from_dict({"tasks": [{"builtin": "clinc151"}]}))


def test_du_yaml_builds_the_five_builtins():
    cfg = load_config(ROOT / "examples" / "du.yaml")
    assert cfg.model == "minilm" and cfg.mixing.temperature == 2.0
    assert [t.name for t in build_tasks(cfg)] == list(builtin_task_names())


def test_user_task_from_config_relative_paths_defaults_and_templates():
    cfg = load_config(ROOT / "examples" / "my_task" / "my_task.yaml")
    tasks, loaded = load_project(cfg)
    home = tasks[0]
    assert home.metric == "accuracy" and home.labels == (
        "lights_off", "lights_on", "lock_door", "set_thermostat", "start_vacuum")
    assert home.templates[2].prompt.startswith("Classify this request ({labels})")
    assert {s: len(p.examples) for s, p in loaded["home_intent"].items()} == {"train": 30, "validation": 10, "test": 10}
    snips = loaded["snips_intent"]
    assert [len(snips[s].examples) for s in ("train", "validation", "test")] == [500, 100, 100]
    assert snips["train"].available == 13_084


def test_default_templates_and_metrics_per_kind(tmp_path):
    entries = [
        {"name": f"t_{kind}", "kind": kind, "path": "d.jsonl", "input": ["a", "b"] if kind != "tagging" else "a",
         "target": "y"}
        for kind in ("classification", "tagging", "generation", "yesno")
    ]
    tasks = build_tasks(config_from_dict({"tasks": entries}, base_dir=tmp_path))
    assert [t.metric for t in tasks] == ["accuracy", "slot_f1", "rouge", "accuracy"]
    assert all(len(t.templates) == 3 for t in tasks)
    assert "a: {a}\nb: {b}" in tasks[0].templates[0].prompt
    assert "{text}" in tasks[1].templates[0].prompt
    assert tasks[0].source.paths == {"train": str((tmp_path / "d.jsonl").resolve())}


def test_bad_user_templates_are_config_errors():
    base = {"name": "t", "kind": "classification", "path": "d.jsonl", "input": "text", "target": "y"}
    with pytest.raises(ConfigError, match=r"unknown placeholder\(s\) \['utterance'\]"):
        build_tasks(config_from_dict({"tasks": [{**base, "templates": ["{utterance}"]}]}))
    with pytest.raises(ConfigError, match="must contain `{target}`"):
        build_tasks(config_from_dict({"tasks": [{**base, "templates": [{"prompt": "{text}", "target": "A:"}]}]}))
    with pytest.raises(ConfigError, match="cannot be overridden"):
        build_tasks(config_from_dict({"tasks": [{"builtin": "clinc150", "input": "utterance"}]}))


def test_max_examples_classification_is_a_seeded_sample_in_file_order():
    task = get_task("clinc150")
    examples = bundled()["clinc150"]["train"].examples
    a = subset(examples, task, 600, seed=0)
    assert a == subset(examples, task, 600, seed=0) and a != subset(examples, task, 600, seed=1)
    assert [ex.origin.line for ex in a] == sorted(ex.origin.line for ex in a)
    assert len({ex.target for ex in a}) > 140  # the file is sorted by intent; the first 600 would hold 6
    slots = load_split(get_task("snips_slots"), "test", max_examples=5)
    assert [ex.origin.line for ex in slots.examples] == [1, 2, 3, 4, 5] and slots.available == 700


def test_max_examples_per_split_and_per_task_name():
    tasks = [get_task("snips_intent"), get_task("dialogsum")]
    per_split = load_tasks(tasks, max_examples={"train": 7})
    assert [len(per_split[t]["train"].examples) for t in ("snips_intent", "dialogsum")] == [7, 7]
    assert len(per_split["snips_intent"]["test"].examples) == 700
    per_task = load_tasks(tasks, max_examples={"snips_intent": 3, "dialogsum": {"test": 2}})
    assert {s: len(p.examples) for s, p in per_task["snips_intent"].items()} == {"train": 3, "validation": 3, "test": 3}
    assert {s: len(p.examples) for s, p in per_task["dialogsum"].items()} == {"train": 500, "test": 2}
