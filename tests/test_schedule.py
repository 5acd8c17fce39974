"""Schedules against their closed forms (Hugging Face's formulas) at chosen steps."""

from __future__ import annotations

import math

import pytest
import torch

from tasktune.errors import TasktuneError
from tasktune.train.schedule import make_scheduler, warmup_steps_from_ratio

BASE_LR = 0.1


def _lrs(name: str, warmup: int, total: int, steps: int) -> list[float]:
    """The lr of the first param group before each optimizer step 0..steps-1."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=BASE_LR)
    sched = make_scheduler(opt, name, warmup, total)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _closed_form(name: str, s: int, warmup: int, total: int) -> float:
    if s < warmup:
        return BASE_LR * s / warmup
    p = min(1.0, (s - warmup) / (total - warmup))
    return BASE_LR * {"cosine": 0.5 * (1 + math.cos(math.pi * p)), "linear": 1 - p, "constant": 1.0}[name]


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_matches_closed_form(name):
    warmup, total = 4, 20
    lrs = _lrs(name, warmup, total, total + 3)
    for s in (0, 1, 3, 4, 5, 9, 12, 19, 20, 22):
        assert lrs[s] == pytest.approx(_closed_form(name, s, warmup, total), abs=1e-12), s


def test_hand_values():
    cos = _lrs("cosine", 2, 10, 11)
    assert cos[0] == 0.0 and cos[1] == pytest.approx(0.05)  # warmup starts from 0
    assert cos[2] == pytest.approx(0.1)  # peak right after warmup
    assert cos[6] == pytest.approx(0.05)  # half way through the decay: cos(pi/2) = 0
    assert cos[10] == pytest.approx(0.0, abs=1e-15)
    lin = _lrs("linear", 0, 10, 11)
    assert lin[0] == pytest.approx(0.1) and lin[5] == pytest.approx(0.05) and lin[10] == 0.0
    const = _lrs("constant", 5, 10, 11)
    assert const[2] == pytest.approx(0.04) and const[5:] == [pytest.approx(0.1)] * 6


def test_each_group_keeps_its_base_lr():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-2}])
    sched = make_scheduler(opt, "linear", 0, 4)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.75e-3, 0.75e-2])


def test_state_round_trip_is_json_safe():
    import json

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    sched = make_scheduler(opt, "cosine", 3, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    sched2 = make_scheduler(opt2, "cosine", 3, 10)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_warmup_from_ratio_and_errors():
    assert warmup_steps_from_ratio(0.06, 100) == 6
    assert warmup_steps_from_ratio(0.06, 101) == 7  # rounded up
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    with pytest.raises(TasktuneError, match="unknown lr schedule 'exp'"):
        make_scheduler(opt, "exp", 0, 10)
    with pytest.raises(TasktuneError, match="warmup_steps"):
        make_scheduler(opt, "cosine", 11, 10)
    with pytest.raises(TasktuneError, match="total_steps"):
        make_scheduler(opt, "cosine", 0, 0)
