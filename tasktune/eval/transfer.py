"""Task affinity by lookahead (Fifty et al. 2021, "Efficiently Identifying Task Groupings").

Z[i][j] = 1 - L_i(theta - lr * g_j) / L_i(theta): how much one gradient step on task j's
training batch lowers task i's validation loss, measured on the shared parameters (the
shared LoRA adapter of a `multi` runner, or all trainable weights). Positive: j helps i;
negative: j hurts i. Averaged over a few batches.
"""

from __future__ import annotations

import random

import torch

from tasktune.model.runner import Runner
from tasktune.tasks.spec import Example


def _loss(runner: Runner, task: str, examples: list[Example]) -> torch.Tensor:
    return runner.task_losses(runner.collate(examples))[task]


def task_affinity(
    runner: Runner,
    train_data: dict[str, list[Example]],
    val_data: dict[str, list[Example]],
    *,
    lr: float = 1e-2,
    batches: int = 3,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Returns Z[i][j] for every pair of tasks that have train and validation data."""
    tasks = [t for t in train_data if train_data[t] and val_data.get(t)]
    shared = [p for p in runner.model.parameters() if p.requires_grad]
    rng = random.Random(seed)
    runner.eval()  # no dropout: the only change between the two losses is the step
    totals = {i: {j: 0.0 for j in tasks} for i in tasks}
    for _ in range(batches):
        val_batches = {i: rng.sample(val_data[i], min(batch_size, len(val_data[i]))) for i in tasks}
        with torch.no_grad():
            before = {i: float(_loss(runner, i, val_batches[i])) for i in tasks}
        for j in tasks:
            train_batch = rng.sample(train_data[j], min(batch_size, len(train_data[j])))
            grads = torch.autograd.grad(_loss(runner, j, train_batch), shared, allow_unused=True)
            saved = [p.detach().clone() for p in shared]
            with torch.no_grad():
                for p, g in zip(shared, grads):
                    if g is not None:
                        p.sub_(lr * g)
                for i in tasks:
                    after = float(_loss(runner, i, val_batches[i]))
                    totals[i][j] += (1.0 - after / before[i]) if before[i] > 0 else 0.0
                for p, s in zip(shared, saved):
                    p.copy_(s)
    return {i: {j: v / batches for j, v in row.items()} for i, row in totals.items()}
