"""ProjectConfig task entries -> `Task` objects. Reads no data (that is tasktune.data's job).

- `builtin: NAME` looks NAME up in the registry (bundled or registered from Python) and
  applies the entry's overrides: `name`, `templates`, `metric`, `labels`, `label_map`, and
  data paths. Giving any of `path` / `validation_path` / `eval_path` replaces the bundled
  files entirely (train / validation / test; splits not given are absent), read by the
  builtin's own reader, so e.g. a user's Circa-layout TSV loads as the `yesno` task circa.
- a user's own task is declared by its data (`path`s or `dataset`), `kind`, `input`
  and `target`. Without `templates` it gets three defaults for its kind; without `metric`
  the kind's default; without `labels` the label set is inferred from the train split at
  load time (tasktune.data.load).

Relative paths resolve against cfg.base_dir (the config file's folder).
"""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path

from tasktune.config import ProjectConfig, TaskEntry
from tasktune.errors import ConfigError
from tasktune.tasks.registry import get_task, registered_task_names
from tasktune.tasks.render import PROMPT_VARIABLES
from tasktune.tasks.spec import SPLITS, DataSource, Task, Template

DEFAULT_METRICS: dict[str, str] = {
    "classification": "accuracy",
    "tagging": "slot_f1",
    "generation": "rouge",
    "yesno": "accuracy",
}

_DEFAULT_PROMPTS: dict[str, tuple[str, ...]] = {
    "classification": (
        "Classify the following text.\n{body}\nLabel:",
        "{body}\n\nWhich category does this belong to?",
        "What is the intent of this message?\n{body}",
    ),
    "yesno": (
        "{body}\nDoes the answer mean yes or no?",
        "Read the exchange and say what the answer means.\n{body}\nMeaning:",
        "{body}\n\nIs this a yes, a no, or something in between?",
    ),
    "tagging": (
        "Extract the slots from this sentence as 'slot: value' pairs separated by ';' (or 'none').\n{text}",
        "Sentence: {text}\nSlots:",
        "List the entities mentioned in: \"{text}\"",
    ),
    "generation": (
        "{body}\n\nWrite the response for the input above.",
        "Input:\n{body}\nOutput:",
        "Complete the task for this input.\n\n{body}",
    ),
}


def default_templates(kind: str, input_fields: tuple[str, ...]) -> tuple[Template, ...]:
    """Three FLAN-style templates for a kind over the given input fields."""
    if len(input_fields) == 1:
        body = "{" + input_fields[0] + "}"
    else:
        body = "\n".join(f"{field}: {{{field}}}" for field in input_fields)
    return tuple(Template(prompt.replace("{body}", body)) for prompt in _DEFAULT_PROMPTS[kind])


def _placeholders(fmt: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"template {fmt!r}: {exc}") from None


def parse_templates(task_name: str, raw: list[str | dict[str, str]], input_fields: tuple[str, ...]) -> tuple[Template, ...]:
    """User templates: a string is a prompt; a dict is {prompt, target}. Placeholders must be
    input fields, `text` or `labels` (prompt) and `target` (target)."""
    allowed = set(input_fields) | set(PROMPT_VARIABLES) | {"tokens"}
    templates = []
    for i, item in enumerate(raw):
        where = f"task '{task_name}', templates.{i}"
        if isinstance(item, str):
            item = {"prompt": item}
        extra = set(item) - {"prompt", "target"}
        if extra or "prompt" not in item:
            raise ConfigError(f"{where}: a template is a string or a mapping with `prompt` (and optional `target`)")
        unknown = _placeholders(item["prompt"]) - allowed
        if unknown:
            raise ConfigError(f"{where}: unknown placeholder(s) {sorted(unknown)}; use one of {sorted(allowed)}")
        target = item.get("target", "{target}")
        if _placeholders(target) != {"target"}:
            raise ConfigError(f"{where}: a target template must contain `{{target}}` and nothing else in braces")
        templates.append(Template(prompt=item["prompt"], target=target))
    if not templates:
        raise ConfigError(f"task '{task_name}': `templates:` is empty")
    return tuple(templates)


def _resolve(base_dir: str, path: str) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (Path(base_dir) / p).resolve())


def _split_paths(entry: TaskEntry, base_dir: str) -> dict[str, str]:
    given = {"train": entry.path, "validation": entry.validation_path, "test": entry.eval_path}
    return {split: _resolve(base_dir, p) for split, p in given.items() if p}


def _labels(kind: str, labels: list[str] | None) -> tuple[str, ...] | None:
    if labels is None:
        return None
    if kind == "tagging":  # slot types; accept B-/I- tags and fold them
        folded = [lab[2:] if lab[:2] in ("B-", "I-") else lab for lab in labels if lab != "O"]
        return tuple(dict.fromkeys(folded))
    return tuple(dict.fromkeys(labels))


def _from_builtin(entry: TaskEntry, base_dir: str) -> Task:
    try:
        task = get_task(str(entry.builtin))
    except ConfigError:
        known = ", ".join(registered_task_names())
        raise ConfigError(f"unknown builtin task '{entry.builtin}'; known: {known}") from None
    for key in ("input", "target", "dataset", "splits", "references"):
        if getattr(entry, key) is not None:
            raise ConfigError(f"task '{entry.task_name}': `{key}` cannot be overridden for builtin '{entry.builtin}'")
    if entry.kind is not None and entry.kind != task.kind:
        raise ConfigError(f"task '{entry.task_name}': builtin '{entry.builtin}' is a {task.kind} task, not {entry.kind}")
    changes: dict = {"name": entry.task_name}
    paths = _split_paths(entry, base_dir)
    if paths:
        changes["source"] = dataclasses.replace(task.source, paths=paths, format=entry.format or "")
    if entry.templates is not None:
        changes["templates"] = parse_templates(entry.task_name, entry.templates, task.input_fields)
    if entry.metric:
        changes["metric"] = entry.metric
    if entry.labels is not None:
        changes["labels"] = _labels(task.kind, entry.labels)
    if entry.label_map is not None:
        changes["label_map"] = dict(entry.label_map)
    return dataclasses.replace(task, **changes)


def _from_entry(entry: TaskEntry, base_dir: str) -> Task:
    name = entry.task_name
    kind = str(entry.kind)
    inputs = (entry.input,) if isinstance(entry.input, str) else tuple(entry.input or ())
    if kind == "tagging" and len(inputs) != 1:
        raise ConfigError(f"task '{name}': a tagging task has exactly one `input:` (the tokens field)")
    if entry.splits and set(entry.splits) - set(SPLITS):
        raise ConfigError(f"task '{name}': `splits:` keys are our split names ({', '.join(SPLITS)}), "
                          f"mapped to the dataset's; got {sorted(set(entry.splits) - set(SPLITS))}")
    if entry.dataset:
        local = Path(base_dir) / entry.dataset
        dataset = str(local.resolve()) if local.exists() else entry.dataset
        source = DataSource(kind="hf", dataset=dataset, paths=dict(entry.splits or {}))
    else:
        source = DataSource(kind="file", paths=_split_paths(entry, base_dir), format=entry.format or "")
    templates = (parse_templates(name, entry.templates, inputs) if entry.templates is not None
                 else default_templates(kind, inputs))
    return Task(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        source=source,
        input_fields=inputs,
        target_field=str(entry.target),
        templates=templates,
        metric=entry.metric or DEFAULT_METRICS[kind],
        labels=_labels(kind, entry.labels),
        label_map=dict(entry.label_map) if entry.label_map else None,
        description=f"user task '{name}' ({kind})",
        reference_fields=tuple(entry.references or ()),
    )


def build_task(entry: TaskEntry, base_dir: str = ".") -> Task:
    """One config entry -> its Task."""
    return _from_builtin(entry, base_dir) if entry.builtin is not None else _from_entry(entry, base_dir)


def build_tasks(cfg: ProjectConfig) -> list[Task]:
    """Every task of the config, in config order. An entry that cannot become a task is
    reported with its file and line (`project.yaml:7: tasks.2: ...`)."""
    tasks = []
    for i, entry in enumerate(cfg.tasks):
        try:
            tasks.append(build_task(entry, cfg.base_dir))
        except ConfigError as exc:
            raise ConfigError(f"{cfg.task_where(i)}: {exc}") from None
    return tasks
