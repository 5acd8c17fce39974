"""What a project's data looks like before any training: counts, label distributions,
token lengths, the mixing rates the config implies, and rendered examples to eyeball.

`data_stats` returns plain dicts (JSON-ready) so the CLI can print a table and the report
can embed it:

    {"tasks": {name: {"kind", "metric", "mixing_rate",
                      "splits": {split: {"records", "skipped", "excluded",
                                         "labels" (classification / yesno) | "slot_types" (tagging),
                                         "in_scope", "out_of_scope" (when "oos" is a label),
                                         "tokens": {"p50", "p90", "p99", "max"}}}}},
     "mixing": {"policy", "rates"}}

Token lengths are of the rendered prompt + target (validate.token_lengths, causal).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from typing import Any

from tasktune.config import ProjectConfig
from tasktune.data.load import LoadedSplit, load_project, load_split
from tasktune.data.validate import token_lengths
from tasktune.errors import ConfigError
from tasktune.tasks.from_config import build_tasks
from tasktune.tasks.render import bio_spans, render
from tasktune.tasks.spec import Example, Rendered, Task

OUT_OF_SCOPE = "oos"


def percentiles(values: list[int]) -> dict[str, int]:
    """p50 / p90 / p99 / max by the nearest-rank method (an actual observed length)."""
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    ordered = sorted(values)

    def rank(p: float) -> int:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1]}


def label_counts(task: Task, examples: list[Example]) -> dict[str, int]:
    """Labels (classification / yesno) or slot types (tagging: one per span), most common first."""
    if task.kind == "tagging":
        counts = Counter(slot for ex in examples for slot, _, _ in bio_spans(list(ex.target)))
    else:
        counts = Counter(str(ex.target) for ex in examples)
    return dict(counts.most_common())


def split_stats(task: Task, part: LoadedSplit, tokenizer: Any, seed: int = 0) -> dict[str, Any]:
    """The stats of one loaded split (see the module docstring)."""
    out: dict[str, Any] = {"records": len(part.examples), "skipped": len(part.skipped), "excluded": len(part.excluded)}
    if part.skipped:
        out["skipped_rows"] = [str(issue) for issue in part.skipped]
    if task.kind in ("classification", "yesno"):
        out["labels"] = label_counts(task, part.examples)
        if task.labels and OUT_OF_SCOPE in task.labels:
            oos = out["labels"].get(OUT_OF_SCOPE, 0)
            out["in_scope"], out["out_of_scope"] = len(part.examples) - oos, oos
    elif task.kind == "tagging":
        out["slot_types"] = label_counts(task, part.examples)
    if tokenizer is not None:
        out["tokens"] = percentiles(token_lengths(part.examples, task, tokenizer, seed))
    return out


def _mixing(cfg: ProjectConfig, sizes: dict[str, int]) -> dict[str, Any]:
    try:
        from tasktune.data.mixing import mixing_rates
    except ImportError as exc:  # mixing.py is another module's job; stats still work without it
        return {"policy": cfg.mixing.policy, "rates": None, "error": f"mixing unavailable: {exc}"}
    usable = {name: n for name, n in sizes.items() if n > 0}
    try:
        rates = mixing_rates(cfg.mixing, usable) if usable else {}
    except Exception as exc:  # a bad mixing config should not hide the data stats
        return {"policy": cfg.mixing.policy, "rates": None, "error": str(exc)}
    return {"policy": cfg.mixing.policy, "rates": {name: rates.get(name, 0.0) for name in sizes}}


def data_stats(cfg: ProjectConfig, tokenizer: Any, *, skip_invalid: bool = False) -> dict[str, Any]:
    """Stats for every task and split of the config (tokenizer None: no token lengths)."""
    tasks, loaded = load_project(cfg, skip_invalid=skip_invalid)
    sizes = {task.name: len(loaded[task.name]["train"].examples) if "train" in loaded[task.name] else 0
             for task in tasks}
    mixing = _mixing(cfg, sizes)
    rates = mixing["rates"] or {}
    result: dict[str, Any] = {"tasks": {}, "mixing": mixing}
    for task in tasks:
        result["tasks"][task.name] = {
            "kind": task.kind,
            "metric": task.metric,
            "mixing_rate": rates.get(task.name),
            "splits": {split: split_stats(task, part, tokenizer, cfg.seed)
                       for split, part in loaded[task.name].items()},
        }
    return result


def _hash(seed: int, uid: str) -> bytes:
    return hashlib.blake2b(f"preview:{seed}:{uid}".encode(), digest_size=8).digest()


def preview(cfg: ProjectConfig, task_name: str, n: int = 5, seed: int = 0, split: str = "train",
            *, skip_invalid: bool = True) -> list[tuple[Example, Rendered]]:
    """`n` examples of one task's split (a seeded sample, in file order) with their rendering
    under `seed`: what the model will be trained on. Bad rows are skipped by default (a
    preview should show data even while a file still has problems)."""
    tasks = {task.name: task for task in build_tasks(cfg)}
    if task_name not in tasks:
        raise ConfigError(f"no task '{task_name}' in the config (tasks: {', '.join(tasks)})")
    part = load_split(tasks[task_name], split, skip_invalid=skip_invalid)
    task = part.task or tasks[task_name]
    chosen = sorted(sorted(part.examples, key=lambda ex: _hash(seed, ex.uid))[:n],
                    key=lambda ex: ex.origin.line)
    return [(ex, render(task, ex, seed)) for ex in chosen]


def _top(counts: dict[str, int] | None, k: int = 3) -> str:
    if not counts:
        return ""
    shown = ", ".join(f"{name} {n}" for name, n in list(counts.items())[:k])
    return shown + (f", ... ({len(counts)} in all)" if len(counts) > k else "")


def format_stats(stats: dict[str, Any], console: Any) -> None:
    """Print `data_stats` output: a table of counts, token lengths and mixing rates, then the
    most common labels per split (rich Console; fits 80 columns)."""
    from rich.table import Table

    table = Table(title="data")
    for column in ("task", "split", "rows", "skipped", "excluded", "tokens p50/90/99/max", "rate"):
        table.add_column(column, justify="left" if column in ("task", "split") else "right")
    label_lines = []
    for name, task in stats["tasks"].items():
        for i, (split, s) in enumerate(task["splits"].items()):
            tokens = s.get("tokens")
            length = "/".join(str(tokens[k]) for k in ("p50", "p90", "p99", "max")) if tokens else "-"
            rate = task["mixing_rate"]
            table.add_row(name if i == 0 else "", split, str(s["records"]), str(s["skipped"]), str(s["excluded"]),
                          length, f"{rate:.3f}" if (i == 0 and rate is not None) else "")
            labels = _top(s.get("labels") or s.get("slot_types"))
            if "in_scope" in s:
                labels = f"in-scope {s['in_scope']}, out-of-scope {s['out_of_scope']}; {labels}"
            if labels:
                label_lines.append(f"{name}/{split}: {labels}")
    console.print(table)
    for name, task in stats["tasks"].items():
        for split, s in task["splits"].items():
            for row in s.get("skipped_rows", []):
                console.print(f"skipped {name}/{split}: {row}", markup=False, highlight=False, emoji=False)
    for line in label_lines:
        console.print(line, markup=False, highlight=False, emoji=False)
    mixing = stats["mixing"]
    console.print(f"mixing policy: {mixing['policy']}" + (f" ({mixing['error']})" if mixing.get("error") else ""),
                  markup=False, emoji=False)
