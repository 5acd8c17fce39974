"""Raw records from files and Hugging Face datasets, each with the line it came from.

Every reader returns a `RowStream`: the display path for error messages and an iterator of
`(line, item)` where `line` is the 1-based physical line (JSONL: the line; CSV/TSV: the
row's first line, the header being line 1; datasets: the row index + 1) and `item` is a
record dict or a `RowIssue` (bad JSON, a CSV row with the wrong number of fields). A bad row
never raises: the caller decides whether to stop or skip. An `ExcludedRow` is a row the
source's own format says is not an example (Circa's rows with no majority label): it is
counted and listed, never an error.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from tasktune.errors import RowIssue, TasktuneError

Record = dict[str, Any]


@dataclass
class ExcludedRow(RowIssue):
    """A row left out by the source's definition (not a data error), e.g. no gold label."""


Item = Union[Record, RowIssue]


@dataclass
class RowStream:
    """Rows of one split of one source; `path` names it in every issue."""

    path: str
    rows: Iterable[tuple[int, Item]]


FORMATS = ("jsonl", "csv", "tsv")
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}


def file_format(path: str | Path, format: str = "") -> str:
    """The format named by `format`, else by the suffix; TasktuneError if neither says."""
    if format:
        if format not in FORMATS:
            raise TasktuneError(f"{path}: unknown format '{format}' (use one of {', '.join(FORMATS)})")
        return format
    fmt = _SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise TasktuneError(f"{path}: cannot tell the format from the suffix; set `format:` (jsonl, csv or tsv)")
    return fmt


def _open(path: Path):
    if not path.is_file():
        raise TasktuneError(f"{path}: data file not found")
    return path.open(encoding="utf-8", newline="")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Item]]:
    """One JSON object per line; blank lines are skipped (they still count as lines)."""
    path = Path(path)
    with _open(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_no, RowIssue(str(path), line_no, "json", f"invalid JSON: {exc.msg} (column {exc.colno})")
                continue
            if not isinstance(record, dict):
                yield line_no, RowIssue(str(path), line_no, "json", f"expected a JSON object, got {type(record).__name__}")
                continue
            yield line_no, record


def iter_delimited(path: str | Path, delimiter: str) -> Iterator[tuple[int, Item]]:
    """CSV/TSV with a header row. A row whose field count differs from the header's is an
    issue; a quoted field may span lines (the row's first line is reported)."""
    path = Path(path)
    with _open(path) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield 1, RowIssue(str(path), 1, "", f"unreadable header: {exc}")
            return
        header = [h.strip() for h in header]
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield start, RowIssue(str(path), start, "", f"malformed row: {exc}")
                continue
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield start, RowIssue(str(path), start, "", f"expected {len(header)} fields (as in the header), found {len(row)}")
                continue
            yield start, dict(zip(header, row))


def read_file(path: str | Path, format: str = "") -> RowStream:
    """A jsonl / csv / tsv file (format from `format` or the suffix)."""
    fmt = file_format(path, format)
    if fmt == "jsonl":
        rows: Iterable[tuple[int, Item]] = iter_jsonl(path)
    else:
        rows = iter_delimited(path, "," if fmt == "csv" else "\t")
    if not Path(path).is_file():  # fail now, with the path, rather than at first iteration
        raise TasktuneError(f"{path}: data file not found")
    return RowStream(str(path), rows)


_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "dev", "val"), "test": ("test",)}


def _folder_jsonl(folder: Path, split: str) -> Path | None:
    for name in _SPLIT_ALIASES.get(split, (split,)):
        for suffix in (".jsonl", ".json"):
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in ("dataset_dict.json", "dataset_info.json", "state.json"))


def _dataset_rows(dataset: Any) -> Iterator[tuple[int, Item]]:
    for index, row in enumerate(dataset, start=1):
        yield index, dict(row)


def read_hf(dataset: str, split: str, split_name: str | None = None) -> RowStream | None:
    """A Hugging Face dataset: a folder saved with `save_to_disk`, a folder of
    `{split}.jsonl` files (validation also as valid/dev/val), or a hub name (offline: a
    TasktuneError naming it). `split_name` is the dataset's name for our `split`; when it is
    None a missing validation/test split is simply absent (None)."""
    folder = Path(dataset)
    wanted = split_name or split
    if folder.is_dir() and not _is_saved_dataset(folder):
        found = _folder_jsonl(folder, wanted) if split_name else _folder_jsonl(folder, split)
        if found is None:
            if split_name or split == "train":
                raise TasktuneError(f"{folder}: no {wanted}.jsonl in the dataset folder")
            return None
        return read_file(found, "jsonl")
    import datasets

    try:
        if folder.is_dir():
            loaded = datasets.load_from_disk(str(folder))
        else:
            loaded = datasets.load_dataset(dataset)
    except Exception as exc:  # the datasets library raises many types; the user needs the name
        raise TasktuneError(
            f"cannot load Hugging Face dataset '{dataset}' ({type(exc).__name__}: {exc}); offline, "
            "use a local folder (save_to_disk or jsonl files)"
        ) from None
    if isinstance(loaded, datasets.Dataset):
        splits = {"train": loaded}
    else:
        splits = dict(loaded)
    names = (split_name,) if split_name else _SPLIT_ALIASES.get(split, (split,))
    chosen = next((splits[name] for name in names if name in splits), None)
    if chosen is None:
        if split_name or split == "train":
            raise TasktuneError(f"Hugging Face dataset '{dataset}' has no split '{wanted}' (it has {', '.join(splits)})")
        return None
    return RowStream(f"{dataset}[{wanted}]", _dataset_rows(chosen))
