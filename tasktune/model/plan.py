"""Which adapter serves which task, per strategy.

The runner, the trainer and the exporter only see an `AdapterPlan`: a list of adapter
names and a task -> adapter map. `single` gives every task its own adapter, `multi` one
shared adapter, `grouped` one per task group, `cgc` per task a gated mixture of common
and task-specific experts, `full` none (all weights train).
"""

from __future__ import annotations

from dataclasses import dataclass

from tasktune.errors import TasktuneError

STRATEGIES = ("single", "multi", "grouped", "full", "cgc")
SHARED = "shared"


@dataclass(frozen=True)
class AdapterPlan:
    strategy: str
    adapters: tuple[str, ...]
    task_adapter: dict[str, str]

    @property
    def uses_lora(self) -> bool:
        return self.strategy != "full"


def check_strategy(strategy: str) -> str:
    """`strategy`, or TasktuneError naming the known ones (cheap: call it before loading a model)."""
    if strategy not in STRATEGIES:
        raise TasktuneError(f"unknown strategy '{strategy}'; choose from {', '.join(STRATEGIES)}")
    return strategy


def plan_for(strategy: str, task_names: list[str], groups: list[list[str]] | None = None) -> AdapterPlan:
    if strategy == "single":
        return AdapterPlan("single", tuple(task_names), {t: t for t in task_names})
    if strategy == "cgc":  # one gated expert mixture per task, folded to one adapter per task
        return AdapterPlan("cgc", tuple(task_names), {t: t for t in task_names})
    if strategy == "multi":
        return AdapterPlan("multi", (SHARED,), {t: SHARED for t in task_names})
    if strategy == "full":
        return AdapterPlan("full", (), {})
    if strategy == "grouped":
        if not groups:
            raise TasktuneError("strategy 'grouped' needs task groups (from the affinity matrix or the config)")
        names = tuple(f"group{i}" for i in range(len(groups)))
        mapping = {t: names[i] for i, group in enumerate(groups) for t in group}
        missing = [t for t in task_names if t not in mapping]
        if missing:
            raise TasktuneError(f"tasks not in any group: {', '.join(missing)}")
        return AdapterPlan("grouped", names, mapping)
    check_strategy(strategy)  # raises for an unknown one
    raise AssertionError(f"strategy {strategy!r} is in STRATEGIES but plan_for has no branch for it")
