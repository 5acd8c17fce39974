"""The built-in dialogue-understanding tasks, declared as data over the bundled datasets.

Each task names a reader in `tasktune.data.builtin_readers` (the bundled files have their
own layouts: CLINC150 is one JSON object, SNIPS three aligned line files, Circa a TSV) and
the record fields that reader produces. Nothing is read here except the two small label
lists (CLINC150's domains.json, SNIPS' slot types), so declaring the tasks stays cheap.

Circa's strict labels are long sentences ("Probably yes / sometimes yes"); targets use the
short slugs of `CIRCA_STRICT`, and `CIRCA_RELAXED` is the paper's strict -> relaxed mapping
(probably-yes -> yes, probably-no -> no, not-sure -> other).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from tasktune.tasks.spec import DataSource, Task, Template

DATA_DIR = Path(__file__).resolve().parent.parent / "resources" / "data"

# Circa goldstandard1 text -> target slug (the file's own curly apostrophe and a straight one).
CIRCA_STRICT: dict[str, str] = {
    "Yes": "yes",
    "No": "no",
    "Probably yes / sometimes yes": "probably-yes",
    "Probably no": "probably-no",
    "Yes, subject to some conditions": "yes-upon-condition",
    "In the middle, neither yes nor no": "in-the-middle",
    "Other": "other",
    "I am not sure how X will interpret Y\u2019s answer": "not-sure",
    "I am not sure how X will interpret Y's answer": "not-sure",
}
CIRCA_LABELS: tuple[str, ...] = (
    "yes", "no", "probably-yes", "probably-no", "yes-upon-condition", "in-the-middle", "other", "not-sure",
)
CIRCA_RELAXED: dict[str, str] = {
    "yes": "yes",
    "no": "no",
    "probably-yes": "yes",
    "probably-no": "no",
    "yes-upon-condition": "yes-upon-condition",
    "in-the-middle": "in-the-middle",
    "other": "other",
    "not-sure": "other",
}

SNIPS_INTENTS: tuple[str, ...] = (
    "AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic", "RateBook", "SearchCreativeWork",
    "SearchScreeningEvent",
)


@cache
def clinc150_labels() -> tuple[str, ...]:
    """The 150 intents in domains.json order, then "oos" (out of scope)."""
    domains = json.loads((DATA_DIR / "clinc150" / "domains.json").read_text(encoding="utf-8"))
    return tuple(intent for intents in domains.values() for intent in intents) + ("oos",)


@cache
def snips_slot_types() -> tuple[str, ...]:
    """The 39 SNIPS slot types (no B-/I-), sorted, read from the train tags."""
    types = set()
    for line in (DATA_DIR / "snips" / "train" / "seq.out").read_text(encoding="utf-8").splitlines():
        types.update(tag[2:] for tag in line.split() if tag != "O")
    return tuple(sorted(types))


def _clinc150() -> Task:
    return Task(
        name="clinc150",
        kind="classification",
        source=DataSource(kind="builtin", reader="clinc150"),
        input_fields=("text",),
        target_field="intent",
        templates=(
            Template("What is the intent of this request?\n{text}"),
            Template("A user says to a banking, travel and home assistant: \"{text}\"\n"
                     "Which intent is this (or oos if it is out of scope)?"),
            Template("Utterance: {text}\nIntent:"),
            Template("Classify the user's request into one of 150 intents, or oos.\n\n{text}"),
        ),
        metric="accuracy",
        labels=clinc150_labels(),
        description="CLINC150 intent detection (150 intents in 10 domains) with out-of-scope queries "
        "labelled 'oos'. Splits: train 15,000 + 100 oos, validation 3,000 + 100, test 4,500 + 1,000.",
        licence="CC BY 3.0 (Larson et al., EMNLP 2019)",
    )


def _snips_intent() -> Task:
    return Task(
        name="snips_intent",
        kind="classification",
        source=DataSource(kind="builtin", reader="snips"),
        input_fields=("text",),
        target_field="intent",
        templates=(
            Template("What does the user want to do?\n{text}"),
            Template("Utterance: {text}\nIntent:"),
            Template("Classify the intent of this voice-assistant command: \"{text}\""),
        ),
        metric="accuracy",
        labels=SNIPS_INTENTS,
        description="SNIPS intent detection, 7 intents; split of Goo et al. 2018 "
        "(train 13,084 / validation 700 / test 700).",
        licence="CC0 (Snips NLU benchmark)",
    )


def _snips_slots() -> Task:
    return Task(
        name="snips_slots",
        kind="tagging",
        source=DataSource(kind="builtin", reader="snips"),
        input_fields=("tokens",),
        target_field="tags",
        templates=(
            Template("Extract the slots from this request as 'slot: value' pairs separated by ';' "
                     "(or 'none').\n{text}"),
            Template("Sentence: {text}\nSlots:"),
            Template("Fill the slots (artist, playlist, city, timeRange, ...) mentioned in: \"{text}\""),
        ),
        metric="slot_f1",
        labels=snips_slot_types(),
        description="SNIPS slot filling (39 slot types, BIO tags per word), rendered for generation as "
        "'slot: value' pairs; split of Goo et al. 2018 (train 13,084 / validation 700 / test 700).",
        licence="CC0 (Snips NLU benchmark)",
    )


def _dialogsum() -> Task:
    return Task(
        name="dialogsum",
        kind="generation",
        source=DataSource(kind="builtin", reader="dialogsum"),
        input_fields=("dialogue",),
        target_field="summary",
        templates=(
            Template("Summarize this dialogue.\n\n{dialogue}"),
            Template("{dialogue}\n\nWhat was going on in the conversation above? Write a short summary."),
            Template("Dialogue:\n{dialogue}\n\nSummary:"),
        ),
        metric="rouge",
        reference_fields=("summary2", "summary3"),
        description="DialogSum dialogue summarisation. The 12,460-dialogue train file is not bundled, so "
        "train = the official dev file (500 dialogues), test = the test file (500, three reference "
        "summaries each); there is no validation split.",
        licence="CC BY-NC-SA 4.0 (Chen et al., Findings of ACL 2021); non-commercial",
    )


def _circa() -> Task:
    return Task(
        name="circa",
        kind="yesno",
        source=DataSource(kind="builtin", reader="circa"),
        input_fields=("context", "question", "answer"),
        target_field="label",
        templates=(
            Template("{context}\nX asks: \"{question}\"\nY answers: \"{answer}\"\n"
                     "What does Y mean: yes, no, probably yes, probably no, yes upon condition, "
                     "in the middle, other or not sure?"),
            Template("Context: {context}\nQuestion: {question}\nAnswer: {answer}\n"
                     "Is the answer a yes or a no?"),
            Template("Read the indirect answer and say what it means.\n"
                     "Situation: {context}\nQ: {question}\nA: {answer}\nMeaning:"),
        ),
        metric="accuracy",
        labels=CIRCA_LABELS,
        label_map=dict(CIRCA_RELAXED),
        description="Circa indirect answers to yes/no questions, strict labels (goldstandard1) as slugs; "
        "label_map gives the relaxed labels (probably-yes -> yes, probably-no -> no, not-sure -> other). "
        "Splits: the bundled tune -> train, dev -> validation, test -> test. Rows without a majority "
        "strict label are excluded and counted in the load summary.",
        licence="CC BY-SA 4.0 (Louis, Roth and Radlinski, EMNLP 2020)",
    )


def builtin_tasks() -> dict[str, Task]:
    """Every built-in task by name (fresh objects; the registry keeps the shared copies)."""
    tasks = [_clinc150(), _snips_intent(), _snips_slots(), _dialogsum(), _circa()]
    return {task.name: task for task in tasks}
