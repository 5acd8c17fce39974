"""Per-task validation loss: drives early stopping, the dynamic mixer and the report."""

from __future__ import annotations

import torch

from tasktune.model.runner import Runner
from tasktune.tasks.spec import Example


@torch.no_grad()
def validation_losses(
    runner: Runner, val_data: dict[str, list[Example]], max_examples: int, batch_size: int
) -> dict[str, float]:
    """Mean loss per task over its first `max_examples` validation examples (single-task
    batches, so each task's loss is its plain mean)."""
    runner.eval()
    out: dict[str, float] = {}
    for task, examples in val_data.items():
        examples = examples[:max_examples]
        if not examples:
            continue
        total, n = 0.0, 0
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            losses = runner.task_losses(runner.collate(chunk))
            total += float(losses[task]) * len(chunk)
            n += len(chunk)
        out[task] = total / n
    return out
