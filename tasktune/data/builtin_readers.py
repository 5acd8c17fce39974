"""Readers for the bundled datasets' own layouts, producing the records the built-in tasks
(tasktune.tasks.builtin) declare. `read_builtin(reader, split, path)` reads the bundled file
for `split`, or `path` when a config overrides it with a file in the same layout.

Record fields:
- clinc150: {"text", "intent"}; line = the utterance's line in the pretty-printed JSON.
- snips: {"text", "tokens", "tags", "intent"} from seq.in / seq.out / label (path = folder).
- dialogsum: {"dialogue", "summary"} (+ "summary2", "summary3" in the test file, where
  "summary" is summary1). No validation split: train = the dev file.
- circa: {"context", "question", "answer", "label"}: label = the strict goldstandard1 as a
  slug (tasktune.tasks.builtin.CIRCA_STRICT; an unknown wording is passed through for the
  validator to report). Rows with an empty goldstandard1 are `ExcludedRow`s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from tasktune.data.readers import ExcludedRow, Item, RowStream, iter_delimited, iter_jsonl
from tasktune.errors import RowIssue, TasktuneError
from tasktune.tasks.builtin import CIRCA_STRICT, DATA_DIR

_SPLIT_FILES: dict[str, dict[str, str]] = {
    "clinc150": {"train": "clinc150/data_full.json", "validation": "clinc150/data_full.json",
                 "test": "clinc150/data_full.json"},
    "snips": {"train": "snips/train", "validation": "snips/valid", "test": "snips/test"},
    "dialogsum": {"train": "dialogsum/dialogsum.dev.jsonl", "test": "dialogsum/dialogsum.test.jsonl"},
    "circa": {"train": "circa/circa_data_tune.tsv", "validation": "circa/circa_data_dev.tsv",
              "test": "circa/circa_data_test.tsv"},
}
_CLINC_KEYS = {"train": ("train", "oos_train"), "validation": ("val", "oos_val"), "test": ("test", "oos_test")}
_CLINC_LIST = re.compile(r'^\s*"(\w+)"\s*:\s*\[')


def _clinc_lines(text: str) -> dict[str, list[int]]:
    """Per top-level key, the 1-based line of each pair's utterance in the pretty-printed
    file (a pair is "[", utterance, label, "]"). Empty for a compact, one-line file."""
    lines: dict[str, list[int]] = {}
    key = None
    rows = text.splitlines()
    for i, row in enumerate(rows):
        match = _CLINC_LIST.match(row)
        if match and row.startswith('    "'):
            key = match.group(1)
            lines[key] = []
        elif key is not None and row.strip() == "[" and i + 1 < len(rows):
            lines[key].append(i + 2)
    return lines


def read_clinc150(split: str, path: Path) -> Iterator[tuple[int, Item]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        yield exc.lineno, RowIssue(str(path), exc.lineno, "json", f"invalid JSON: {exc.msg}")
        return
    positions = _clinc_lines(text)
    for key in _CLINC_KEYS[split]:
        pairs = data.get(key, [])
        where = positions.get(key, [])
        for index, pair in enumerate(pairs):
            line = where[index] if len(where) == len(pairs) else index + 1
            if not (isinstance(pair, list) and len(pair) == 2):
                yield line, RowIssue(str(path), line, key, "expected an [utterance, intent] pair")
                continue
            yield line, {"text": pair[0], "intent": pair[1]}


def read_snips(split: str, path: Path) -> Iterator[tuple[int, Item]]:
    files = {name: (path / name) for name in ("seq.in", "seq.out", "label")}
    for name, file in files.items():
        if not file.is_file():
            raise TasktuneError(f"{file}: SNIPS file not found (a SNIPS folder has seq.in, seq.out and label)")
    texts = [f.read_text(encoding="utf-8").splitlines() for f in files.values()]
    if len({len(t) for t in texts}) != 1:
        raise TasktuneError(f"{path}: seq.in, seq.out and label have different line counts "
                            f"({', '.join(str(len(t)) for t in texts)})")
    for line, (words, tags, intent) in enumerate(zip(*texts), start=1):
        if not words.strip():
            continue
        yield line, {"text": " ".join(words.split()), "tokens": words.split(), "tags": tags.split(),
                     "intent": intent.strip()}


def read_dialogsum(split: str, path: Path) -> Iterator[tuple[int, Item]]:
    for line, record in iter_jsonl(path):
        if isinstance(record, RowIssue):
            yield line, record
            continue
        out = {"dialogue": record.get("dialogue")}
        if "summary" in record:
            out["summary"] = record["summary"]
        elif "summary1" in record:
            out["summary"] = record["summary1"]
            out.update({k: record[k] for k in ("summary2", "summary3") if k in record})
        yield line, out


_CIRCA_COLUMNS = {"context": "context", "question-X": "question", "answer-Y": "answer", "goldstandard1": "label"}


def read_circa(split: str, path: Path) -> Iterator[tuple[int, Item]]:
    for line, record in iter_delimited(path, "\t"):
        if isinstance(record, RowIssue):
            yield line, record
            continue
        missing = [column for column in _CIRCA_COLUMNS if column not in record]
        if missing:
            yield line, RowIssue(str(path), line, missing[0], "missing field (not a column of this Circa-layout file)")
            continue
        strict = record["goldstandard1"].strip()
        if not strict:
            yield line, ExcludedRow(str(path), line, "goldstandard1", "no majority strict label (excluded, as in the paper)")
            continue
        out = {ours: record[column] for column, ours in _CIRCA_COLUMNS.items()}
        out["label"] = CIRCA_STRICT.get(strict, strict)
        yield line, out


READERS: dict[str, Callable[[str, Path], Iterator[tuple[int, Item]]]] = {
    "clinc150": read_clinc150,
    "snips": read_snips,
    "dialogsum": read_dialogsum,
    "circa": read_circa,
}


def builtin_splits(reader: str, paths: dict[str, str] | None = None) -> tuple[str, ...]:
    """The splits a builtin source has: the overridden ones, else the bundled ones."""
    return tuple(paths) if paths else tuple(_SPLIT_FILES[reader])


def read_builtin(reader: str, split: str, paths: dict[str, str] | None = None) -> RowStream | None:
    """One split of a builtin source; None when the source has no such split."""
    if reader not in READERS:
        raise TasktuneError(f"unknown builtin reader '{reader}' (known: {', '.join(READERS)})")
    if paths:
        if split not in paths:
            return None
        path = Path(paths[split])
    elif split in _SPLIT_FILES[reader]:
        path = DATA_DIR / _SPLIT_FILES[reader][split]
    else:
        return None
    if not path.exists():
        raise TasktuneError(f"{path}: data not found for {reader} split '{split}'")
    shown = path / "seq.in" if reader == "snips" else path
    return RowStream(str(shown), READERS[reader](split, path))
