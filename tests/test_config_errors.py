"""Config mistakes name the file, line and entry, and surface before a model loads or a
long run starts."""

from __future__ import annotations

import pytest

from tasktune.compare import run_compare
from tasktune.config import load_config
from tasktune.errors import ConfigError, TasktuneError
from tasktune.tasks.from_config import build_tasks
from tasktune.train.run import train_strategy

YAML = """\
model: {model}
tasks:
  - builtin: clinc150
  - builtin: {second}
"""


def write(tmp_path, second="snips_intent", model="/nowhere/model"):
    path = tmp_path / "project.yaml"
    path.write_text(YAML.format(model=model, second=second))
    return path


def test_unknown_builtin_names_file_line_and_entry(tmp_path):
    path = write(tmp_path, second="clinc15")
    with pytest.raises(ConfigError, match=rf"^{path}:4: tasks\.1: unknown builtin task 'clinc15'; known: .*clinc150"):
        build_tasks(load_config(path))


def test_bad_template_placeholder_names_its_entry(tmp_path):
    path = tmp_path / "project.yaml"
    path.write_text("tasks:\n  - builtin: clinc150\n    templates: ['Say {nope}']\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: tasks\.0: .*unknown placeholder"):
        build_tasks(load_config(path))


def test_train_reports_a_bad_strategy_or_task_before_loading_the_model(tmp_path):
    # the model folder does not exist: the errors below come first, or this would be a model error
    with pytest.raises(TasktuneError, match="unknown strategy 'singel'; choose from single"):
        train_strategy(load_config(write(tmp_path)), "singel", tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="tasks.1: unknown builtin task 'nope'"):
        train_strategy(load_config(write(tmp_path, second="nope")), "single", tmp_path / "run", progress=False)


def test_compare_checks_every_strategy_first(tmp_path):
    out = tmp_path / "cmp"
    with pytest.raises(TasktuneError, match="unknown strategy 'mult'"):
        run_compare(load_config(write(tmp_path)), ["single", "mult"], out)
    assert not out.exists()
