"""Example -> text-to-text (`Rendered`): the one place prompts and targets are written.

Training, evaluation and serving all call `render`, so a prompt that is trained is the
prompt that is served. `parse_output` (parsers.py) inverts the target text.

Prompt variables: every input field (a token list is joined by spaces), `{text}` (for
tagging: the tokens joined by spaces) and `{labels}` (the label set, human-readable,
comma-separated). Targets:
- classification / yesno: the label written for people: "PlayMusic" -> "play music",
  "yes-upon-condition" -> "yes upon condition" (verbatim when two labels would read alike);
- tagging: "slot: value" pairs in input order joined by "; ", or "none";
- generation: the target text.
"""

from __future__ import annotations

from functools import lru_cache

from tasktune.tasks.parsers import find_span, label_keys
from tasktune.tasks.spec import Example, FieldValue, Rendered, Task

PROMPT_VARIABLES = ("text", "labels")


@lru_cache(maxsize=256)
def _label_texts(labels: tuple[str, ...]) -> dict[str, str]:
    keys = label_keys(labels)
    return {label: key for key, label in keys.items()}


@lru_cache(maxsize=256)
def _labels_line(labels: tuple[str, ...]) -> str:
    texts = _label_texts(labels)
    return ", ".join(texts.get(label, label) for label in labels)


def label_text(task: Task, label: str) -> str:
    """How a label is written in a target (and so what a model should generate for it):
    its normalised form when that is unique in the label set, else the label verbatim."""
    return _label_texts(tuple(task.labels or ())).get(label, label)


def bio_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """(slot type, start, end) spans of a BIO sequence; an I- that does not continue a span
    of its own type starts one."""
    spans: list[tuple[str, int, int]] = []
    current: list | None = None
    for i, tag in enumerate(tags):
        if tag.startswith("B-") or (tag.startswith("I-") and (current is None or current[0] != tag[2:])):
            current = [tag[2:], i, i + 1]
            spans.append(current)  # type: ignore[arg-type]
        elif tag.startswith("I-") and current is not None:
            current[2] = i + 1
        else:
            current = None
    return [(slot, start, end) for slot, start, end in spans]


def slots_text(tokens: list[str], tags: list[str]) -> str:
    """BIO tags -> "slot: value; slot: value" ("none" without slots). A value gets a " [N]"
    word position only where the parser's forward search would find another occurrence."""
    pairs = []
    taken = [False] * len(tokens)
    pos = 0
    for slot, start, end in bio_spans(tags):
        words = tokens[start:end]
        value = " ".join(words)
        if find_span(tokens, words, pos, taken) != start:
            value += f" [{start + 1}]"
        pairs.append(f"{slot}: {value}")
        for i in range(start, end):
            taken[i] = True
        pos = end
    return "; ".join(pairs) if pairs else "none"


def target_text(task: Task, example: Example) -> str:
    """The target as text, before the template's `target` wrapper."""
    target = example.target
    if task.kind == "tagging":
        return slots_text(list(example.inputs["tokens"]), list(target))
    if task.kind in ("classification", "yesno"):
        return label_text(task, str(target))
    return str(target)


def _as_text(value: FieldValue) -> str:
    return " ".join(value) if isinstance(value, list) else str(value)


def prompt_variables(task: Task, example: Example) -> dict[str, str]:
    """Everything a prompt template may name."""
    variables = {name: _as_text(value) for name, value in example.inputs.items()}
    if task.kind == "tagging" and "tokens" in example.inputs:
        variables["text"] = _as_text(example.inputs["tokens"])
    variables.setdefault("text", _as_text(example.inputs[task.input_fields[0]]) if task.input_fields else "")
    variables["labels"] = _labels_line(tuple(task.labels or ()))
    return variables


def render(task: Task, example: Example, seed: int = 0) -> Rendered:
    """The prompt and target text of `example` under the template chosen for it by `seed`."""
    index = task.template_for(example, seed)
    template = task.templates[index]
    prompt = template.prompt.format(**prompt_variables(task, example))
    target = template.target.format(target=target_text(task, example))
    return Rendered(prompt=prompt, target=target, template_index=index)
