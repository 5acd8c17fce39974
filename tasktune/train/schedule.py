"""Learning-rate schedules: linear warmup from 0, then cosine to 0, linear to 0 or constant.

The multiplier at step s (the number of `scheduler.step()` calls so far; the first
optimizer step runs at s = 0) is, with W warmup steps and T total steps:

    s < W:   s / W                                  (so the very first step has lr 0)
    s >= W:  p = min(1, (s - W) / max(1, T - W))
             cosine:   0.5 * (1 + cos(pi * p))
             linear:   1 - p
             constant: 1

These are the formulas of Hugging Face's `get_{cosine,linear,constant}_schedule_with_warmup`,
so runs compare with theirs step for step. The multiplier is a small callable dataclass
rather than a closure so that `LambdaLR.state_dict()` stores it (as JSON-safe fields) and a
resumed run checks that it continues the schedule it started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from tasktune.errors import TasktuneError

ScheduleName = Literal["cosine", "linear", "constant"]
SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")


@dataclass
class WarmupSchedule:
    """The lr multiplier as a function of the step; see the module docstring."""

    name: str
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.name == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear


def warmup_steps_from_ratio(warmup_ratio: float, total_steps: int) -> int:
    """`TrainSettings.warmup_ratio` as a step count (rounded up, as Hugging Face does)."""
    return math.ceil(warmup_ratio * total_steps)


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int
) -> LambdaLR:
    """A `LambdaLR` with the same multiplier on every param group (each keeps its own base lr).

    Call `scheduler.step()` once after each `optimizer.step()`.
    """
    if name not in SCHEDULES:
        raise TasktuneError(f"unknown lr schedule '{name}' (choose one of: {', '.join(SCHEDULES)})")
    if total_steps <= 0:
        raise TasktuneError(f"the lr schedule needs total_steps > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise TasktuneError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    return LambdaLR(optimizer, WarmupSchedule(name, int(warmup_steps), int(total_steps)))
