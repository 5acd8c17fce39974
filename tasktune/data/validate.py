"""Record -> `Example`, or the list of what is wrong with it (file, line, field, problem).

Checks, per record: a missing input / target field, a mistyped one (a number, list or null
where text is expected; tagging: tokens and tags must be lists of strings or
space-separated strings of equal length), an empty target, and a label outside the task's
label set (for tagging: a tag that is not O / B-slot / I-slot of a known slot type). All
problems of a record are reported, so a user can fix a file in one pass.

`check_lengths` runs after loading, once a tokenizer is known: an example longer than
max_length tokens (rendered prompt + target for causal LMs, the input text for encoders).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from tasktune.errors import RowIssue
from tasktune.tasks.render import render
from tasktune.tasks.spec import Example, Origin, Task


def _describe(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text_field(record: dict, field: str, issue) -> str | None:
    if field not in record:
        issue(field, "missing field")
        return None
    value = record[field]
    if not isinstance(value, str):
        issue(field, f"expected text, got {_describe(value)}")
        return None
    return value


def _word_list(record: dict, field: str, issue) -> list[str] | None:
    """A token or tag list: a list of strings, or a space-separated string (CSV/TSV)."""
    if field not in record:
        issue(field, "missing field")
        return None
    value = record[field]
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    issue(field, f"expected a list of strings (or space-separated text), got {_describe(value)}")
    return None


def _check_tags(tags: list[str], slot_types: tuple[str, ...] | None, field: str, issue) -> None:
    for i, tag in enumerate(tags):
        if tag == "O":
            continue
        if tag[:2] not in ("B-", "I-") or len(tag) < 3:
            issue(field, f"tag {i + 1} '{tag}' is not O, B-<slot> or I-<slot>")
            return
        if slot_types is not None and tag[2:] not in slot_types:
            issue(field, f"unknown slot type '{tag[2:]}' in tag {i + 1} '{tag}'")
            return


def to_example(task: Task, split: str, path: str, line: int, record: dict,
               labels: tuple[str, ...] | None = None) -> Example | list[RowIssue]:
    """Validate one record against `task` (and `labels`, the label set to check against when
    it differs from task.labels, e.g. inferred from train)."""
    issues: list[RowIssue] = []

    def issue(field: str, message: str) -> None:
        issues.append(RowIssue(path, line, field, message))

    labels = labels if labels is not None else task.labels
    inputs: dict[str, Any] = {}
    target: Any = None
    if task.kind == "tagging":
        tokens = _word_list(record, task.input_fields[0], issue)
        tags = _word_list(record, task.target_field, issue)
        if tokens is not None:
            inputs["tokens"] = tokens
            if task.input_fields[0] != "tokens":
                inputs[task.input_fields[0]] = tokens
            if not tokens:
                issue(task.input_fields[0], "empty token list")
        if tags is not None:
            if not tags:
                issue(task.target_field, "empty target")
            elif tokens is not None and len(tags) != len(tokens):
                issue(task.target_field, f"{len(tags)} tags for {len(tokens)} tokens (need one tag per token)")
            else:
                _check_tags(tags, labels, task.target_field, issue)
            target = tags
    else:
        for field in task.input_fields:
            value = _text_field(record, field, issue)
            if value is not None:
                inputs[field] = value
        value = _text_field(record, task.target_field, issue)
        if value is not None:
            target = value.strip()
            if not target:
                issue(task.target_field, "empty target")
            elif labels is not None and task.kind in ("classification", "yesno") and target not in labels:
                shown = ", ".join(labels[:12]) + (", ..." if len(labels) > 12 else "")
                issue(task.target_field, f"unknown label '{target}' (labels: {shown})")
    references: tuple[str, ...] = ()
    if task.reference_fields and target and not issues:
        extra = []
        for field in task.reference_fields:
            if field in record:  # optional: only multi-reference splits carry them
                value = _text_field(record, field, issue)
                if value is not None and value.strip():
                    extra.append(value.strip())
        references = (target, *extra) if extra else ()
    if issues:
        return issues
    uid = f"{task.name}/{split}/{line}"
    return Example(task=task.name, uid=uid, inputs=inputs, target=target, origin=Origin(path, line),
                   references=references)


def infer_labels(task: Task, records: Iterable[dict]) -> tuple[str, ...]:
    """The label set seen in (train) records, sorted: labels for classification / yesno, slot
    types for tagging. Malformed values are ignored here; validation reports them."""
    seen: set[str] = set()
    for record in records:
        value = record.get(task.target_field)
        if task.kind == "tagging":
            tags = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
            seen.update(t[2:] for t in tags if isinstance(t, str) and t[:2] in ("B-", "I-") and len(t) > 2)
        elif isinstance(value, str) and value.strip():
            seen.add(value.strip())
    return tuple(sorted(seen))


def _input_text(task: Task, example: Example) -> str:
    values = (example.inputs[field] for field in task.input_fields if field in example.inputs)
    return " ".join(" ".join(v) if isinstance(v, list) else str(v) for v in values)


def token_lengths(examples: list[Example], task: Task, tokenizer: Any, seed: int = 0, *,
                  causal: bool = True) -> list[int]:
    """Tokens per example. causal: prompt (with the tokenizer's special tokens) + target +
    1 for the end-of-sequence token; encoder (causal=False): the input fields joined by
    spaces, with special tokens."""
    if not examples:
        return []
    if causal:
        rendered = [render(task, ex, seed) for ex in examples]
        prompts = _count_tokens(tokenizer, [r.prompt for r in rendered], special=True)
        targets = _count_tokens(tokenizer, [r.target for r in rendered], special=False)
        return [p + t + 1 for p, t in zip(prompts, targets)]
    return _count_tokens(tokenizer, [_input_text(task, ex) for ex in examples], special=True)


_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plain_backend(tokenizer: Any) -> Any:
    """A copy of a fast tokenizer's backend with padding and truncation off (cached per
    tokenizer): counting through it makes no per-text Python objects and no "longer than
    the model maximum" warnings (long is what we measure)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        return _PLAIN[tokenizer]
    except (KeyError, TypeError):
        pass
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_padding()
    plain.no_truncation()
    try:
        _PLAIN[tokenizer] = plain
    except TypeError:  # not weak-referenceable: just do not cache
        pass
    return plain


def _count_tokens(tokenizer: Any, texts: list[str], special: bool) -> list[int]:
    plain = _plain_backend(tokenizer)
    if plain is not None:
        return [len(enc.ids) for enc in plain.encode_batch(texts, add_special_tokens=special)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=special, truncation=False)["input_ids"]]


def check_lengths(examples: list[Example], task: Task, tokenizer: Any, max_length: int, seed: int = 0, *,
                  causal: bool = True) -> list[RowIssue]:
    """An issue for every example longer than max_length tokens (see token_lengths)."""
    lengths = token_lengths(examples, task, tokenizer, seed, causal=causal)
    what = "prompt + target" if causal else "input"
    return [
        RowIssue(ex.origin.path, ex.origin.line, _longest_field(task, ex),
                 f"too long: {n} tokens of {what} > max_length {max_length}")
        for ex, n in zip(examples, lengths)
        if n > max_length
    ]


def _longest_field(task: Task, example: Example) -> str:
    """The input field to blame for a too-long example: the longest one."""
    fields = [f for f in task.input_fields if f in example.inputs] or [task.target_field]
    return max(fields, key=lambda f: len(str(example.inputs.get(f, ""))))
