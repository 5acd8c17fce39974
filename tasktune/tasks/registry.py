"""A plain name -> Task registry (seqio-style): the built-in tasks plus any a user registers.

A config's `builtin: NAME` is looked up here, so a task registered from Python can be
named in YAML exactly like a bundled one.
"""

from __future__ import annotations

from tasktune.errors import ConfigError
from tasktune.tasks.spec import Task

_REGISTRY: dict[str, Task] = {}
_BUILTIN_NAMES: tuple[str, ...] = ()


def _ensure_builtins() -> None:
    global _BUILTIN_NAMES
    if _BUILTIN_NAMES:
        return
    from tasktune.tasks.builtin import builtin_tasks

    tasks = builtin_tasks()
    _BUILTIN_NAMES = tuple(tasks)
    for name, task in tasks.items():
        _REGISTRY.setdefault(name, task)


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Make `task` available by name. Registering a different task under a taken name is an
    error unless `replace=True` (re-registering the identical task is a no-op)."""
    _ensure_builtins()
    existing = _REGISTRY.get(task.name)
    if existing is not None and existing != task and not replace:
        raise ConfigError(f"a task named '{task.name}' is already registered (pass replace=True to replace it)")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task `name`; ConfigError listing the known names if there is none."""
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"unknown task '{name}'; known tasks: {known}") from None


def builtin_task_names() -> tuple[str, ...]:
    """The names of the bundled tasks, in declaration order."""
    _ensure_builtins()
    return _BUILTIN_NAMES


def registered_task_names() -> tuple[str, ...]:
    """Every registered name (built-in and user-registered), sorted."""
    _ensure_builtins()
    return tuple(sorted(_REGISTRY))
