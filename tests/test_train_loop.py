"""The training loop (tasktune/train/loop.py) reads the device only when it logs: between
log steps the host never waits for the device. Counted on the CPU by wrapping every way a
tensor is read on the host (`.item()`, `.tolist()`, `float()`, `int()`, `bool()`) and
keeping the calls made from tasktune/train/ (torch's own bookkeeping, such as AdamW's CPU
step counters, and the collate's host tensors are not device reads). The logged values
are the ones the loop always logged: the per-task means of the runner's losses."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import tasktune.train
from projects import tiny_config
from tasktune.data.sampler import MixtureSampler
from tasktune.model.runner import Runner
from tasktune.train.run import train_strategy
from tasktune.train.weighting import Weighter

TRAIN_DIR = str(Path(tasktune.train.__file__).parent)
READS = ("item", "tolist", "__float__", "__int__", "__bool__")
STEPS, LOG_EVERY, ACCUM = 7, 3, 2


def _detached(values: dict) -> dict:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in values.items()}


@pytest.mark.parametrize(("model", "method"), [("tiny_llama", "static"), ("tiny_bert", "uncertainty")])
def test_loop_reads_the_device_only_at_log_steps(tmp_path, request, monkeypatch, model, method):
    cfg = tiny_config(
        tmp_path, request.getfixturevalue(model), max_steps=STEPS, log_every=LOG_EVERY, grad_accum=ACCUM,
        batch_size=4, weighting={"method": method},
    )
    step = [0]  # the step the loop is in (1-based), from the sampler
    reads: Counter[int] = Counter()
    losses: list[tuple[int, dict, dict]] = []  # (step, runner losses, shares) per micro-batch
    weights: dict[int, dict] = {}  # the weights the weighter returned, last micro-batch of a step

    def set_step(original):
        def wrapped(self, n):
            step[0] = n + 1
            return original(self, n)

        return wrapped

    def count(original):
        def wrapped(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(TRAIN_DIR):
                reads[step[0]] += 1
            return original(self, *args, **kwargs)

        return wrapped

    def record_losses(original):
        def wrapped(self, batch):
            out = original(self, batch)
            losses.append((step[0], _detached(out), dict(self.last_shares)))
            return out

        return wrapped

    def record_weights(original):
        def wrapped(self, *args, **kwargs):
            used = original(self, *args, **kwargs)
            weights[step[0]] = _detached(used)
            return used

        return wrapped

    monkeypatch.setattr(MixtureSampler, "set_step", set_step(MixtureSampler.set_step))
    monkeypatch.setattr(Runner, "task_losses", record_losses(Runner.task_losses))
    monkeypatch.setattr(Weighter, "backward", record_weights(Weighter.backward))
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, count(getattr(torch.Tensor, name)))
    _, result, _ = train_strategy(cfg, "multi", tmp_path / "run", progress=False)
    monkeypatch.undo()  # reading the reference below must not count

    log_steps = [s for s in range(1, STEPS + 1) if s % LOG_EVERY == 0 or s == STEPS]
    # one batched read per log step; the last step also reads the final losses
    assert dict(reads) == {s: 1 + (s == STEPS) for s in log_steps}

    # Reference: the loop as it was, in Python floats: a task's micro-batch mean is
    # loss / share, and its step value the mean over the micro-batches it was in.
    assert len(losses) == STEPS * ACCUM
    means: dict[int, dict[str, list[float]]] = {}
    for s, out, shares in losses:
        for t, loss in out.items():
            means.setdefault(s, {}).setdefault(t, []).append(float(loss) / max(shares.get(t, 1.0), 1e-12))
    window = {s: {t: sum(v) / len(v) for t, v in by_task.items()} for s, by_task in means.items()}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == log_steps
    for r in rows:
        # the same float64 arithmetic (a GPU's division may round 1 ulp apart from the host's)
        assert r["task_loss"] == pytest.approx(window[r["step"]], rel=1e-14, abs=0)
        assert r["weights"] == pytest.approx({t: float(w) for t, w in weights[r["step"]].items()}, rel=1e-14, abs=0)
    last: dict[str, float] = {}
    for s in sorted(window):
        last.update(window[s])
    assert result.final_task_loss == pytest.approx(last, rel=1e-14, abs=0)
    if method == "static":
        assert all(r["weights"] == {"home_intent": 1.0, "snips_slots": 1.0} for r in rows)
