"""What a task is: data, not a class (seqio-style).

A `Task` is a plain frozen dataclass: where its data lives, which fields feed the prompt,
which field is the target, the label set, FLAN-style templates and a metric name. Every
strategy, the evaluator and the server read the same `Task`, so a prompt that is trained
is exactly the prompt that is served.

`Example` is one validated record. It keeps its `origin` (file and line) so that any later
error - a too-long example found at tokenisation time, say - can still name where it came
from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal, Union

TaskKind = Literal["classification", "tagging", "generation", "yesno"]
TASK_KINDS: tuple[str, ...] = ("classification", "tagging", "generation", "yesno")
SPLITS: tuple[str, ...] = ("train", "validation", "test")

FieldValue = Union[str, list[str]]


@dataclass(frozen=True)
class Origin:
    """Where a record came from; `line` is 1-based (a JSONL line, a CSV row counting the header)."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Example:
    """One validated record of one task.

    inputs: field name -> text (or a token list for tagging tasks, under "tokens").
    target: the label (classification, yesno), the summary (generation) or one BIO tag
        per input token (tagging).
    references: every acceptable reference for generation tasks (multi-reference test
        sets); empty means `(target,)`.
    """

    task: str
    uid: str
    inputs: dict[str, FieldValue]
    target: FieldValue
    origin: Origin
    references: tuple[str, ...] = ()

    @property
    def all_references(self) -> tuple[str, ...]:
        return self.references or (str(self.target),)


@dataclass(frozen=True)
class Template:
    """A FLAN-style instruction: `prompt` is a str.format string over the input fields
    (tagging tasks also get `{text}` = tokens joined by spaces); `target` formats the
    rendered target text (`{target}`)."""

    prompt: str
    target: str = "{target}"


@dataclass(frozen=True)
class Rendered:
    """An example turned into text-to-text: loss is taken on `target` only."""

    prompt: str
    target: str
    template_index: int


@dataclass(frozen=True)
class DataSource:
    """Where a task's splits come from.

    kind: "builtin" (a reader in tasktune.data.builtin_readers, named by `reader`),
        "file" (jsonl/csv/tsv paths per split) or "hf" (a Hugging Face dataset name or
        local folder, with split names).
    """

    kind: Literal["builtin", "file", "hf"]
    paths: dict[str, str] = field(default_factory=dict)  # split -> path (file) / split name (hf)
    reader: str = ""  # builtin reader name
    dataset: str = ""  # hf dataset name or folder
    format: str = ""  # jsonl | csv | tsv (file sources); "" = from the suffix


@dataclass(frozen=True)
class Task:
    """A task declaration. `labels` is the closed label set of classification / yesno
    tasks and the slot-type set of tagging tasks (without B-/I- prefixes); None for
    generation. `label_map` maps raw labels to a coarser set for a relaxed metric
    (e.g. Circa strict -> relaxed). `reference_fields` names extra reference fields of
    generation tasks (multi-reference test sets); each present one joins Example.references."""

    name: str
    kind: TaskKind
    source: DataSource
    input_fields: tuple[str, ...]
    target_field: str
    templates: tuple[Template, ...]
    metric: str
    labels: tuple[str, ...] | None = None
    label_map: dict[str, str] | None = None
    description: str = ""
    licence: str = ""
    reference_fields: tuple[str, ...] = ()

    def template_for(self, example: Example, seed: int) -> int:
        """Deterministic template choice: same seed + same example -> same template,
        independent of the order examples are read in."""
        digest = hashlib.blake2b(f"{seed}:{self.name}:{example.uid}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % len(self.templates)


def tag_label_set(slot_types: tuple[str, ...]) -> tuple[str, ...]:
    """BIO tag vocabulary for a tagging task: O, then B-/I- per slot type, in a stable order."""
    tags = ["O"]
    for slot in slot_types:
        tags += [f"B-{slot}", f"I-{slot}"]
    return tuple(tags)
