"""User-facing errors. The CLI prints these as one clear line and exits non-zero;
anything else escaping is a bug in tasktune."""

from __future__ import annotations

from dataclasses import dataclass


class TasktuneError(Exception):
    """An error caused by the user's input (config, data, model path), not by tasktune."""


@dataclass
class RowIssue:
    """One bad record: which file, which line, which field, and what is wrong."""

    path: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: field '{self.field}': {self.message}" if self.field else f"{where}: {self.message}"


class DataError(TasktuneError):
    """Invalid records. Holds every issue found so the user can fix them in one pass."""

    def __init__(self, issues: list[RowIssue], hint: str = "use --skip-invalid to skip bad rows"):
        self.issues = issues
        shown = "\n".join(f"  {i}" for i in issues[:20])
        more = f"\n  ... and {len(issues) - 20} more" if len(issues) > 20 else ""
        super().__init__(f"{len(issues)} invalid record(s):\n{shown}{more}\n({hint})")


class ConfigError(TasktuneError):
    """An invalid config file; the message names the file, line and key."""
