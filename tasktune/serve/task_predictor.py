"""A task's served question: /v1/tasks/{task}/predict's prompt, answer set and parser.

The prompt is the task's canonical template rendered with the request's inputs (tasks/
render.py, the same code training used), `parse` inverts the answer text (tasks/parsers.py),
and for a closed-set task (classification, yes/no) `answers` lists every label as its
target is written, so the API can score each one after the prompt as `tasktune eval` does
(branch_scoring.py): an answer is then always one of the labels. For a tagging task
`grammar` is the EBNF its answer must match (slot_grammar.py: the task's slot types, spans
of the request's words), so a guided answer names only real slots and words.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from tasktune.errors import TasktuneError
from tasktune.serve.slot_grammar import slot_grammar
from tasktune.tasks.spec import Task


@dataclass(frozen=True)
class TaskQuery:
    prompt: str
    parse: Callable[[str], tuple[Any, bool]]  # answer text -> (value, valid)
    answers: tuple[str, ...] = ()  # a closed-set task's labels as the model writes them (() = free text)
    labels: tuple[str, ...] = ()  # ... and the label each of those answers is
    grammar: str = ""  # a tagging task's answer grammar (xgrammar EBNF; "" = none)


class TaskPredictor(Protocol):
    """(task name, inputs) -> TaskQuery. Raises LookupError for an unknown task and
    ValueError for unusable inputs."""

    def __call__(self, task: str, inputs: Mapping[str, Any] | str | list[str]) -> TaskQuery: ...


def task_predictor(tasks: Mapping[str, Task] | None = None) -> TaskPredictor:
    """A TaskPredictor over `tasks` (a served run's own tasks, user-declared ones too),
    else over the built-in registry: the task's first template and its parser."""

    def predict(task_name: str, inputs: Mapping[str, Any] | str | list[str]) -> TaskQuery:
        from tasktune.tasks.registry import get_task

        if tasks is not None:
            if task_name not in tasks:
                raise LookupError(f"task {task_name!r} is not served here; tasks: {', '.join(tasks)}")
            return task_query(tasks[task_name], inputs)
        try:
            return task_query(get_task(task_name), inputs)
        except TasktuneError as e:
            raise LookupError(str(e)) from None

    return predict


def named_inputs(task: Task, inputs: Mapping[str, Any] | str | list[str]) -> Mapping[str, Any]:
    """A request's inputs by field: a one-field task's value may come alone (a text, or
    words for tagging), as in Hugging Face's inference API."""
    if isinstance(inputs, Mapping):
        return inputs
    if len(task.input_fields) != 1:
        raise ValueError(f"task {task.name!r} reads the fields {list(task.input_fields)}: pass them by name")
    return {task.input_fields[0]: inputs}


def task_query(task: Task, inputs: Mapping[str, Any] | str | list[str]) -> TaskQuery:
    from tasktune.tasks.parsers import parse_output
    from tasktune.tasks.render import label_text, render
    from tasktune.tasks.spec import Example, Origin

    task = dataclasses.replace(task, templates=task.templates[:1])  # serving uses the canonical template
    inputs = dict(named_inputs(task, inputs))
    if task.kind == "tagging" and isinstance(inputs.get("tokens", inputs.get("text")), str):
        inputs["tokens"] = str(inputs.get("tokens", inputs.get("text"))).split()
    missing = [f for f in task.input_fields if f not in inputs]
    if missing:
        raise ValueError(f"task {task.name!r} needs input field(s) {missing}")
    target = ["O"] * len(inputs["tokens"]) if task.kind == "tagging" else ""
    example = Example(task=task.name, uid="api", inputs=inputs, target=target, origin=Origin("api", 0))
    try:
        prompt = render(task, example, 0).prompt
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise ValueError(f"cannot render task {task.name!r} with these inputs: {e}") from None

    def parse(text: str) -> tuple[Any, bool]:
        parsed = parse_output(task, text, example)
        return parsed.value, parsed.valid

    labels = tuple(task.labels or ()) if task.kind in ("classification", "yesno") else ()
    answers = tuple(task.templates[0].target.format(target=label_text(task, label)) for label in labels)
    grammar = ""
    if task.kind == "tagging" and task.labels:
        prefix, _, suffix = task.templates[0].target.format(target="\0").partition("\0")
        grammar = slot_grammar(tuple(task.labels), list(inputs["tokens"]), prefix, suffix)
    return TaskQuery(prompt, parse, answers, labels, grammar)


def label_probabilities(totals: list[float]) -> list[float]:
    """Each label's probability among the labels from their targets' total log-likelihoods
    (a softmax, as `tasktune eval`'s score_labels takes it)."""
    top = max(totals)
    weights = [math.exp(t - top) for t in totals]
    return [w / sum(weights) for w in weights]


registry_predictor = task_predictor()  # the built-in tasks
