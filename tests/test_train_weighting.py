"""Every loss-weighting method runs through the real training loop of `multi`, logging a
weight per task every step; learnable methods move their weights."""

from __future__ import annotations

import json

import pytest

from projects import tiny_config
from tasktune.train.run import train_strategy


@pytest.mark.parametrize("method", ["static", "uncertainty", "dwa", "gradnorm", "pcgrad"])
def test_multi_logs_per_task_loss_and_weight_every_step(tmp_path, tiny_bert, method):
    cfg = tiny_config(tmp_path, tiny_bert, max_steps=5, batch_size=8, weighting={"method": method, "dwa_window": 2})
    train_strategy(cfg, "multi", tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert set(r["task_loss"]) == set(r["weights"]) == {"home_intent", "snips_slots"}
        assert all(v > 0 for v in r["task_loss"].values())
    first, last = rows[0]["weights"], rows[-1]["weights"]
    if method == "static":
        assert first == last == {"home_intent": 1.0, "snips_slots": 1.0}
    elif method in ("uncertainty", "gradnorm", "dwa"):
        assert first != last, f"{method} weights never changed"
