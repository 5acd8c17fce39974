"""Checkpoints: bitwise resume, atomic writes, exact optimizer/RNG round trips."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import tasktune.train.checkpoint as ckpt_mod
from tasktune.errors import TasktuneError
from tasktune.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from tasktune.train.schedule import make_scheduler

TOTAL, CUT = 10, 5


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))


def _setup(seed: int):
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = make_scheduler(opt, "cosine", 2, TOTAL)
    return model, opt, sched


def _step(model, opt, sched) -> None:
    """One step that draws from every generator: torch (data + dropout), numpy, python."""
    x = torch.randn(8, 6) * float(np.random.uniform(0.5, 1.5))
    y = torch.randint(0, 3, (8,))
    order = list(range(8))
    random.shuffle(order)
    loss = torch.nn.functional.cross_entropy(model(x[order]), y[order])
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _reference() -> dict[str, torch.Tensor]:
    model, opt, sched = _setup(0)
    _seed_all(123)
    for _ in range(TOTAL):
        _step(model, opt, sched)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _resumed(tmp_path: Path, restore_rng: bool) -> dict[str, torch.Tensor]:
    model, opt, sched = _setup(0)
    _seed_all(123)
    for step in range(1, CUT + 1):
        _step(model, opt, sched)
    save_checkpoint(tmp_path, CUT, tensors=model.state_dict(), optimizer=opt, scheduler=sched, extra={"epoch": 0})
    del model, opt, sched
    # A fresh "process": new objects from another init, every generator scrambled.
    model, opt, sched = _setup(99)
    _seed_all(777)
    loaded = load_checkpoint(latest_checkpoint(tmp_path), optimizer=opt, scheduler=sched, restore_rng=restore_rng)
    model.load_state_dict(loaded.tensors)
    assert loaded.step == CUT and loaded.extra == {"epoch": 0}
    for _ in range(loaded.step + 1, TOTAL + 1):
        _step(model, opt, sched)
    return model.state_dict()


def test_resume_is_bitwise_identical(tmp_path):
    ref = _reference()
    got = _resumed(tmp_path, restore_rng=True)
    for name, tensor in ref.items():
        assert torch.equal(got[name], tensor), name


def test_resume_without_rng_diverges(tmp_path):
    """The bitwise test above depends on the RNG restore: without it, dropout and data differ."""
    ref = _reference()
    got = _resumed(tmp_path, restore_rng=False)
    assert not all(torch.equal(got[n], t) for n, t in ref.items())


def test_optimizer_round_trip_preserves_every_state_tensor(tmp_path):
    model, opt, sched = _setup(0)
    _seed_all(1)
    for _ in range(3):
        _step(model, opt, sched)
    path = save_checkpoint(tmp_path, 3, tensors={}, optimizer=opt, scheduler=sched, rng=False)
    _, opt2, sched2 = _setup(5)
    load_checkpoint(path, optimizer=opt2, scheduler=sched2)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]  # betas stay a tuple, lr, initial_lr, flags
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) == 4
    for pid, st in a["state"].items():
        assert st.keys() == b["state"][pid].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in st.items():
            assert value.dtype == b["state"][pid][key].dtype and torch.equal(value, b["state"][pid][key]), (pid, key)
    assert sched2.state_dict() == sched.state_dict()


def test_tensor_learning_rates_keep_their_tensor_through_a_load(tmp_path):
    """A capturable optimizer's learning rates are tensors a CUDA graph and the scheduler hold:
    a load copies the checkpoint's values into them (the checkpoint's are read to the CPU)
    instead of swapping in new tensors."""
    from tasktune.train.graphed_step import graphable_adamw

    p = torch.nn.Parameter(torch.ones(3))
    opt = graphable_adamw([{"params": [p], "lr": 0.25}], 0.25, torch.device("cpu"))
    p.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0]["lr"].fill_(0.125)
    path = save_checkpoint(tmp_path, 1, tensors={}, optimizer=opt, rng=False)
    q = torch.nn.Parameter(torch.ones(3))
    opt2 = graphable_adamw([{"params": [q], "lr": 0.5}], 0.5, torch.device("cpu"))
    held = opt2.param_groups[0]["lr"]
    load_checkpoint(path, optimizer=opt2)
    assert opt2.param_groups[0]["lr"] is held and held.item() == 0.125
    assert torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])


def test_files_are_safetensors_and_json_only(tmp_path):
    model, opt, sched = _setup(0)
    path = save_checkpoint(tmp_path, 0, tensors=model.state_dict(), optimizer=opt, scheduler=sched)
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "state.safetensors", "tensors.safetensors"]
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 0 and "rng" in state
    from safetensors.torch import load_file

    aux = load_file(str(path / "state.safetensors"))
    assert aux["rng.torch_cpu"].dtype == torch.uint8


def test_interrupted_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    model, opt, _ = _setup(0)
    first = save_checkpoint(tmp_path, 5, tensors=model.state_dict(), optimizer=opt)

    def boom(path):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "_fsync_file", boom)  # fails after files are (partly) written
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 7, tensors=model.state_dict(), optimizer=opt)
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]  # temporary folder cleaned up


def test_crash_leftovers_are_never_picked(tmp_path):
    model, _, _ = _setup(0)
    first = save_checkpoint(tmp_path, 2, tensors=model.state_dict())
    # What a killed process leaves behind: a hidden temporary folder with partial files.
    partial = tmp_path / ".tmp-checkpoint-9-123-abcd"
    partial.mkdir()
    (partial / "tensors.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / "checkpoint-11").mkdir()  # not ours / incomplete: no state.json
    assert latest_checkpoint(tmp_path) == first
    assert latest_checkpoint(tmp_path / "missing") is None


def test_keep_last_and_replace(tmp_path):
    t = {"w": torch.arange(4.0)}
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, tensors=t, rng=False, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    save_checkpoint(tmp_path, 4, tensors={"w": torch.ones(2)}, rng=False, keep_last=2)
    assert torch.equal(load_checkpoint(tmp_path / "checkpoint-4").tensors["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, tensors={}, extra={"x": object()}, rng=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TasktuneError, match="not a tasktune checkpoint"):
        load_checkpoint(tmp_path)
    path = save_checkpoint(tmp_path, 1, tensors={}, rng=False)
    _, opt, _ = _setup(0)
    with pytest.raises(TasktuneError, match="no optimizer state"):
        load_checkpoint(path, optimizer=opt)


def test_bf16_and_shared_storage_tensors(tmp_path):
    base = torch.randn(4, 4, dtype=torch.bfloat16)
    path = save_checkpoint(tmp_path, 0, tensors={"a": base, "tied": base, "view": base[1]}, rng=False)
    got = load_checkpoint(path).tensors
    assert got["a"].dtype == torch.bfloat16 and torch.equal(got["tied"], base) and torch.equal(got["view"], base[1])


def test_rng_round_trip_each_generator():
    from tasktune.train.rng import capture_rng_state, restore_rng_state

    _seed_all(3)
    snap = json.loads(json.dumps(capture_rng_state().meta))  # meta must survive JSON
    tensors = capture_rng_state().tensors
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.standard_normal())
    restore_rng_state(ckpt_mod.RngState(tensors=tensors, meta=snap))
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.standard_normal())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2] and first[3] == again[3]
