"""A run killed with SIGKILL at a random step and resumed ends exactly where an
uninterrupted run ends (CPU, deterministic): adapters, heads and the loss log."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from projects import tiny_project

STEPS, EVERY = 14, 3


def _train(config: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tasktune.cli", "train", str(config), "--strategy", "single", "--out", str(out), *extra]
    full_env = {**os.environ, "TASKTUNE_DETERMINISTIC": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(run.glob("adapters/*/adapter_model.safetensors")) + sorted(run.glob("heads/*.safetensors")):
        out.update({f"{f.parent.name}/{f.name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, tiny_llama):
    config = tiny_project(
        tmp_path, tiny_llama, max_steps=STEPS, checkpoint_every=EVERY, batch_size=6, eval_every=4, early_stopping_patience=10
    )
    full = _train(config, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]

    kill_at = random.Random().choice([s for s in range(EVERY + 1, STEPS) if s % EVERY])  # mid-interval
    killed = _train(config, tmp_path / "resumed", env={"TASKTUNE_FAULT_KILL_AT_STEP": str(kill_at)})
    assert killed.returncode == -9, f"expected SIGKILL at step {kill_at}: {killed.stderr[-1000:]}"
    assert not (tmp_path / "resumed" / "adapters").exists()
    resumed = _train(config, tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a, b = _tensors(tmp_path / "full"), _tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume (killed at step {kill_at})"
    log = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert log(tmp_path / "full") == log(tmp_path / "resumed")
