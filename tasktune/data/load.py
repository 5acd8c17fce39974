"""Load a task's splits into validated `Example`s; nothing is dropped silently.

Strict (default): every invalid record of every split is collected and raised as one
`DataError` ("train.jsonl:3: field 'label': unknown label ..."). With `skip_invalid`, bad
records are left out and listed in `LoadedSplit.skipped`. Rows a source itself defines as
non-examples (Circa rows without a majority strict label) are never errors; they are listed
in `LoadedSplit.excluded`. `format_summary` prints all of it.

Label sets: a classification / yesno / tagging task declared without `labels` gets the set
seen in its train split (`resolve_labels`); a label in validation / test that train never
had is then an error. The resolved task is `LoadedSplit.task`.

`max_examples` (an int for every split, or {split: N}) keeps a deterministic subset of the
valid rows: the first N in file order for tagging / generation; for classification / yesno
(whose files are often sorted by label, e.g. CLINC150) the N with the smallest seeded hash
of their uid (a seeded shuffle), kept in file order, so every label is likely present.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from tasktune.config import ProjectConfig
from tasktune.data.builtin_readers import builtin_splits, read_builtin
from tasktune.data.readers import ExcludedRow, RowStream, read_file, read_hf
from tasktune.data.validate import infer_labels, to_example
from tasktune.errors import DataError, RowIssue, TasktuneError
from tasktune.tasks.from_config import build_tasks
from tasktune.tasks.spec import SPLITS, Example, Task

Limit = int | dict[str, int] | None


@dataclass
class LoadedSplit:
    """One split of one task. `available` counts valid records before `max_examples`."""

    examples: list[Example]
    skipped: list[RowIssue] = field(default_factory=list)
    excluded: list[RowIssue] = field(default_factory=list)
    path: str = ""
    task: Task | None = None
    available: int = 0


def task_splits(task: Task) -> tuple[str, ...]:
    """The splits a task's source declares (hf sources without split names: all three, absent
    ones are skipped at load time)."""
    source = task.source
    if source.kind == "builtin":
        return tuple(s for s in SPLITS if s in builtin_splits(source.reader, source.paths))
    if source.kind == "file":
        return tuple(s for s in SPLITS if s in source.paths)
    return tuple(s for s in SPLITS if s in source.paths) if source.paths else SPLITS


def open_split(task: Task, split: str) -> RowStream | None:
    """The raw rows of one split; None if the source has no such split."""
    source = task.source
    if source.kind == "builtin":
        return read_builtin(source.reader, split, source.paths or None)
    if source.kind == "file":
        return read_file(source.paths[split], source.format) if split in source.paths else None
    if source.paths:
        return read_hf(source.dataset, split, source.paths[split]) if split in source.paths else None
    return read_hf(source.dataset, split)


def resolve_labels(task: Task) -> Task:
    """`task` with its label set inferred from train when it declares none (see module doc)."""
    if task.labels is not None or task.kind == "generation":
        return task
    stream = open_split(task, "train")
    if stream is None:
        raise TasktuneError(f"task '{task.name}' has no `labels:` and no train split to infer them from")
    records = (item for _, item in stream.rows if not isinstance(item, RowIssue))
    return dataclasses.replace(task, labels=infer_labels(task, records))


def _limit(max_examples: Limit, split: str) -> int | None:
    if isinstance(max_examples, dict):
        return max_examples.get(split)
    return max_examples


def subset(examples: list[Example], task: Task, n: int, seed: int = 0) -> list[Example]:
    """The deterministic `max_examples` subset (see the module docstring)."""
    if n >= len(examples):
        return examples
    if task.kind not in ("classification", "yesno"):
        return examples[:n]

    def key(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}:{examples[i].uid}".encode(), digest_size=8).digest()

    keep = sorted(sorted(range(len(examples)), key=key)[:n])
    return [examples[i] for i in keep]


def _read(task: Task, split: str) -> tuple[LoadedSplit, list[RowIssue]]:
    stream = open_split(task, split)
    if stream is None:
        raise TasktuneError(f"task '{task.name}' has no {split} split (it has: {', '.join(task_splits(task))})")
    loaded = LoadedSplit(examples=[], path=stream.path, task=task)
    issues: list[RowIssue] = []
    for line, item in stream.rows:
        if isinstance(item, ExcludedRow):
            loaded.excluded.append(item)
        elif isinstance(item, RowIssue):
            issues.append(item)
        else:
            result = to_example(task, split, stream.path, line, item)
            if isinstance(result, list):
                issues.extend(result)
            else:
                loaded.examples.append(result)
    return loaded, issues


def _load(task: Task, split: str, skip_invalid: bool, limit: int | None, seed: int) -> tuple[LoadedSplit, list[RowIssue]]:
    loaded, issues = _read(task, split)
    if skip_invalid:
        loaded.skipped = issues
    loaded.available = len(loaded.examples)
    if limit is not None:
        loaded.examples = subset(loaded.examples, task, limit, seed)
    return loaded, issues


def load_split(task: Task, split: str, *, skip_invalid: bool = False, max_examples: Limit = None,
               seed: int = 0) -> LoadedSplit:
    """One split, validated. Strict mode raises DataError listing every bad record."""
    task = resolve_labels(task)
    loaded, issues = _load(task, split, skip_invalid, _limit(max_examples, split), seed)
    if issues and not skip_invalid:
        raise DataError(issues)
    return loaded


def load_tasks(tasks: Iterable[Task], *, skip_invalid: bool = False, max_examples: Limit = None,
               seed: int = 0, limits: dict[str, Limit] | None = None) -> dict[str, dict[str, LoadedSplit]]:
    """Every split of every task: {task name: {split: LoadedSplit}}. Strict mode reads
    everything first, then raises one DataError with every issue of every task.

    `max_examples`: an int, or {split: N} for every task; a dict keyed by task names (any
    key that is not a split name) is taken as per-task limits, like `limits`
    ({task name: int or {split: N}}), which overrides `max_examples` per task."""
    if isinstance(max_examples, dict) and any(key not in SPLITS for key in max_examples):
        limits, max_examples = {**max_examples, **(limits or {})}, None
    loaded: dict[str, dict[str, LoadedSplit]] = {}
    all_issues: list[RowIssue] = []
    for task in tasks:
        task = resolve_labels(task)
        limit = (limits or {}).get(task.name, max_examples)
        loaded[task.name] = {}
        for split in task_splits(task):
            if task.source.kind == "hf" and not task.source.paths and open_split(task, split) is None:
                continue
            part, issues = _load(task, split, skip_invalid, _limit(limit, split), seed)
            loaded[task.name][split] = part
            all_issues.extend(issues)
    if all_issues and not skip_invalid:
        raise DataError(all_issues)
    return loaded


def load_project(cfg: ProjectConfig, *, skip_invalid: bool = False) -> tuple[list[Task], dict[str, dict[str, LoadedSplit]]]:
    """Build the config's tasks and load them (per-task `max_examples`, seeded by cfg.seed).
    Returns the tasks with label sets resolved, in config order, and their splits."""
    tasks = build_tasks(cfg)
    limits = {entry.task_name: entry.max_examples for entry in cfg.tasks if entry.max_examples is not None}
    loaded = load_tasks(tasks, skip_invalid=skip_invalid, seed=cfg.seed, limits=limits)
    resolved = [_resolved(t, loaded[t.name]) for t in tasks]
    return resolved, loaded


def _resolved(task: Task, splits: dict[str, LoadedSplit]) -> Task:
    part = next(iter(splits.values()), None)
    return part.task if part is not None and part.task is not None else task


def format_skipped(loaded: dict[str, dict[str, LoadedSplit]], limit: int = 50) -> str:
    """Every skipped (invalid) and excluded row, one per line (first `limit` of each split)."""
    lines = []
    for name, splits in loaded.items():
        for split, part in splits.items():
            for title, rows in (("skipped (invalid)", part.skipped), ("excluded by the source", part.excluded)):
                if rows:
                    lines.append(f"{name}/{split}: {len(rows)} {title}")
                    lines += [f"  {row}" for row in rows[:limit]]
                    if len(rows) > limit:
                        lines.append(f"  ... and {len(rows) - limit} more")
    return "\n".join(lines)


def format_summary(loaded: dict[str, dict[str, LoadedSplit]]) -> str:
    """A table of examples / skipped / excluded per task and split, then the rows left out."""
    lines = [f"{'task':<16} {'split':<10} {'examples':>9} {'skipped':>8} {'excluded':>9}"]
    for name, splits in loaded.items():
        for split, part in splits.items():
            shown = f"{len(part.examples)}" + (f"/{part.available}" if part.available != len(part.examples) else "")
            lines.append(f"{name:<16} {split:<10} {shown:>9} {len(part.skipped):>8} {len(part.excluded):>9}")
    rows = format_skipped(loaded)
    return "\n".join(lines) + ("\n" + rows if rows else "")
