"""Model output text -> a task's target value; the inverse of `render`.

A parser never raises on a model's output: anything it cannot read is `Parsed(value,
valid=False)`, which the evaluator counts as wrong (and can report as "unparseable").

- classification / yesno: normalised match against the label set (case, whitespace,
  underscores / hyphens vs spaces, camelCase, trailing punctuation, quotes). yesno also
  accepts the long Circa wordings ("Probably yes / sometimes yes") as aliases.
- tagging: "slot: value; slot: value" -> one BIO tag per input token. Each value is found
  as a token span of `example.inputs["tokens"]`, searching forward from the previous span,
  then from the start; a value may end in " [N]" (1-based word position), which `render`
  adds only when the forward search would otherwise pick the wrong occurrence. "none" ->
  all O. An unknown slot type, a value not in the input or overlapping spans -> invalid.
- generation: the stripped text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from tasktune.tasks.spec import Example, Task

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[\s_\-/]+")
_POSITION = re.compile(r"^(.*?)\s*\[(\d+)\]$")
_EDGE_CHARS = " \t\n\"'`.,;:!?"


@dataclass(frozen=True)
class Parsed:
    """A parsed output: `value` has the type of Example.target (a label, a tag list or a
    text); `valid` is False when the output could not be read (value is then a best effort:
    the raw text for labels, all-O tags for tagging)."""

    value: Any
    valid: bool


def normalize_label(text: str) -> str:
    """The key labels are matched on: "PlayMusic", "play_music" and " Play music. " agree."""
    text = _CAMEL.sub(" ", text.strip().strip(_EDGE_CHARS))
    text = text.replace("\u2019", "'")
    return _SEPARATORS.sub(" ", text).strip().lower()


@lru_cache(maxsize=256)
def label_keys(labels: tuple[str, ...]) -> dict[str, str]:
    """normalize_label(label) -> label, for the labels whose key is unique in the set (a label
    whose key collides with another's is matched, and rendered, only verbatim)."""
    keys: dict[str, list[str]] = {}
    for label in labels:
        keys.setdefault(normalize_label(label), []).append(label)
    return {key: group[0] for key, group in keys.items() if len(group) == 1}


def _yesno_aliases() -> dict[str, str]:
    from tasktune.tasks.builtin import CIRCA_STRICT

    aliases = {normalize_label(text): slug for text, slug in CIRCA_STRICT.items()}
    aliases.update({"probably yes": "probably-yes", "sometimes yes": "probably-yes", "not sure": "not-sure",
                    "yes subject to some conditions": "yes-upon-condition", "neither yes nor no": "in-the-middle"})
    return aliases


def strip_target_template(task: Task, text: str) -> str:
    """Remove the fixed text a template's `target` puts around `{target}` (the longest match
    over the task's templates); text that matches none is returned unchanged."""
    best = text
    for template in task.templates:
        prefix, _, suffix = template.target.partition("{target}")
        if (prefix or suffix) and text.startswith(prefix) and text.endswith(suffix):
            inner = text[len(prefix): len(text) - len(suffix)] if suffix else text[len(prefix):]
            if len(inner) < len(best):
                best = inner
    return best


def _parse_label(task: Task, text: str) -> Parsed:
    labels = task.labels or ()
    if text in labels:
        return Parsed(text, True)
    key = normalize_label(text)
    match = label_keys(tuple(labels)).get(key)
    if match is None and task.kind == "yesno":
        alias = _yesno_aliases().get(key)
        if alias is None and task.label_map:
            # A relaxed label the model produced ("yes"): accept it when it is also a label.
            alias = next((raw for raw, relaxed in task.label_map.items() if normalize_label(relaxed) == key), None)
        if alias is not None and alias in labels:
            match = alias
    return Parsed(match, True) if match is not None else Parsed(text.strip(), False)


def find_span(tokens: list[str], value: list[str], start: int, taken: list[bool]) -> int | None:
    """First position >= start where `value` matches `tokens` (case-insensitively) on free
    positions; then the first from 0. None when the value is not in the input."""
    n = len(value)
    low = [t.lower() for t in tokens]
    want = [v.lower() for v in value]
    for begin in (start, 0):
        for i in range(begin, len(tokens) - n + 1):
            if low[i: i + n] == want and not any(taken[i: i + n]):
                return i
    return None


def parse_slots(text: str, tokens: list[str], slot_types: tuple[str, ...]) -> Parsed:
    """'slot: value; ...' -> BIO tags aligned to tokens (see the module docstring)."""
    tags = ["O"] * len(tokens)
    if normalize_label(text) == "none":
        return Parsed(tags, True)
    types = {s.lower(): s for s in slot_types}
    taken = [False] * len(tokens)
    pos = 0
    parts = [p.strip() for p in text.split(";") if p.strip()]
    if not parts:
        return Parsed(tags, False)
    for part in parts:
        slot, colon, value = part.partition(":")
        slot_type = types.get(slot.strip().lower())
        if not colon or slot_type is None:
            return Parsed(["O"] * len(tokens), False)
        value = value.strip()
        where = _POSITION.match(value)
        at = None
        if where:
            value, at = where.group(1), int(where.group(2)) - 1
        words = value.split()
        if not words:
            return Parsed(["O"] * len(tokens), False)
        if at is not None:
            ok = 0 <= at <= len(tokens) - len(words) and [t.lower() for t in tokens[at: at + len(words)]] == [
                w.lower() for w in words] and not any(taken[at: at + len(words)])
            begin = at if ok else None
        else:
            begin = find_span(tokens, words, pos, taken)
        if begin is None:
            return Parsed(["O"] * len(tokens), False)
        for i in range(begin, begin + len(words)):
            tags[i] = ("B-" if i == begin else "I-") + slot_type
            taken[i] = True
        pos = begin + len(words)
    return Parsed(tags, True)


def parse_output(task: Task, text: str, example: Example | None = None) -> Parsed:
    """Read a model's output for `example` (needed for tagging: the tokens to align to)."""
    if not isinstance(text, str):
        return Parsed(text, False)
    text = strip_target_template(task, text.strip()).strip()
    try:
        if task.kind in ("classification", "yesno"):
            return _parse_label(task, text)
        if task.kind == "tagging":
            if example is None or not isinstance(example.inputs.get("tokens"), list):
                return Parsed([], False)
            return parse_slots(text, list(example.inputs["tokens"]), tuple(task.labels or ()))
        return Parsed(text, bool(text))
    except (ValueError, TypeError, KeyError, IndexError):  # a parser must not crash an evaluation
        return Parsed(text, False)
