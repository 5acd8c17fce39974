"""Mixing policies against hand-computed closed forms."""

from __future__ import annotations

import pytest

from tasktune.config import CurriculumStage, MixingConfig
from tasktune.data.mixing import DynamicMixer, curriculum_stage, mixing_rates
from tasktune.errors import TasktuneError

SIZES = {"intent": 6000, "slots": 2000, "yesno": 1000, "summ": 1000}  # total 10000


def close(rates: dict[str, float], expected: dict[str, float]) -> None:
    assert list(rates) == list(expected)
    assert rates == pytest.approx(expected, abs=1e-12)
    assert sum(rates.values()) == pytest.approx(1.0, abs=1e-12)


def test_proportional() -> None:
    close(mixing_rates(MixingConfig(policy="proportional"), SIZES), {"intent": 0.6, "slots": 0.2, "yesno": 0.1, "summ": 0.1})


def test_capped_uses_t5_k() -> None:
    # K=1500: min(n, K) = 1500, 1500, 1000, 1000 -> /5000
    rates = mixing_rates(MixingConfig(policy="capped", cap=1500), SIZES)
    close(rates, {"intent": 0.3, "slots": 0.3, "yesno": 0.2, "summ": 0.2})
    # K above every size is plain proportional
    close(mixing_rates(MixingConfig(policy="capped", cap=10**6), SIZES), mixing_rates(MixingConfig(), SIZES))


def test_temperature() -> None:
    # T=2: sqrt(p) = sqrt(.6), sqrt(.2), sqrt(.1), sqrt(.1)
    s = [0.6**0.5, 0.2**0.5, 0.1**0.5, 0.1**0.5]
    z = sum(s)
    rates = mixing_rates(MixingConfig(policy="temperature", temperature=2.0), SIZES)
    close(rates, {"intent": s[0] / z, "slots": s[1] / z, "yesno": s[2] / z, "summ": s[3] / z})
    assert rates["intent"] == pytest.approx(0.4177, abs=1e-4)  # 0.7746 / (0.7746 + 0.4472 + 2 * 0.3162)
    # T=1 is proportional; a huge T is nearly uniform
    close(mixing_rates(MixingConfig(policy="temperature", temperature=1.0), SIZES), {"intent": 0.6, "slots": 0.2, "yesno": 0.1, "summ": 0.1})
    big_t = mixing_rates(MixingConfig(policy="temperature", temperature=1e6), SIZES)
    assert max(big_t.values()) - min(big_t.values()) < 1e-5


def test_uniform() -> None:
    close(mixing_rates(MixingConfig(policy="uniform"), SIZES), {k: 0.25 for k in SIZES})


def test_explicit_normalises() -> None:
    cfg = MixingConfig(policy="explicit", rates={"intent": 2, "slots": 1, "yesno": 1, "summ": 0})
    close(mixing_rates(cfg, SIZES), {"intent": 0.5, "slots": 0.25, "yesno": 0.25, "summ": 0.0})


@pytest.mark.parametrize(
    "rates, needle",
    [
        ({"intent": 1, "slots": 1, "yesno": 1}, "summ"),  # missing task
        ({"intent": 1, "slots": 1, "yesno": 1, "summ": 1, "typo_task": 1}, "typo_task"),  # unknown task
        ({"intent": 1, "slots": -0.5, "yesno": 1, "summ": 1}, "slots"),  # negative
        ({"intent": 0, "slots": 0, "yesno": 0, "summ": 0}, "sum"),  # nothing positive
        (None, "rates"),
    ],
)
def test_explicit_errors_name_the_problem(rates, needle) -> None:
    with pytest.raises(TasktuneError, match=needle):
        mixing_rates(MixingConfig(policy="explicit", rates=rates), SIZES)


def test_curriculum_follows_step_and_keeps_last_stage() -> None:
    cfg = MixingConfig(
        policy="curriculum",
        stages=[
            CurriculumStage(steps=100, policy="uniform"),
            CurriculumStage(steps=50, policy="explicit", rates={"intent": 0, "slots": 0, "yesno": 1, "summ": 3}),
            CurriculumStage(steps=10, policy="proportional"),
        ],
    )
    assert [curriculum_stage(cfg.stages, s) for s in (0, 99, 100, 149, 150, 159, 160, 10**6)] == [0, 0, 1, 1, 2, 2, 2, 2]
    close(mixing_rates(cfg, SIZES, step=99), {k: 0.25 for k in SIZES})
    close(mixing_rates(cfg, SIZES, step=100), {"intent": 0.0, "slots": 0.0, "yesno": 0.25, "summ": 0.75})
    close(mixing_rates(cfg, SIZES, step=5000), {"intent": 0.6, "slots": 0.2, "yesno": 0.1, "summ": 0.1})
    with pytest.raises(TasktuneError, match="stages"):
        mixing_rates(MixingConfig(policy="curriculum"), SIZES)


def test_curriculum_stage_own_temperature_and_cap() -> None:
    cfg = MixingConfig(policy="curriculum", stages=[CurriculumStage(steps=1, policy="capped", cap=1000)])
    close(mixing_rates(cfg, SIZES), {k: 0.25 for k in SIZES})
    cfg = MixingConfig(policy="curriculum", stages=[CurriculumStage(steps=1, policy="temperature", temperature=2.0)])
    close(mixing_rates(cfg, SIZES), mixing_rates(MixingConfig(policy="temperature", temperature=2.0), SIZES))


def test_dynamic_raises_lagging_tasks() -> None:
    sizes = {"a": 300, "b": 100}
    cfg = MixingConfig(policy="dynamic", dynamic_base="proportional", dynamic_strength=1.0)
    mixer = DynamicMixer(cfg, sizes)
    close(mixer.rates, {"a": 0.75, "b": 0.25})  # no losses yet: the base rates
    close(mixing_rates(cfg, sizes), {"a": 0.75, "b": 0.25})
    # L = (1, 3), mean 2 -> factors 0.5, 1.5 -> weights .375, .375 -> 0.5 / 0.5
    close(mixer.update({"a": 1.0, "b": 3.0}), {"a": 0.5, "b": 0.5})
    # strength 2 -> factors .25, 2.25 -> weights .1875, .5625 -> 0.25 / 0.75
    mixer2 = DynamicMixer(MixingConfig(policy="dynamic", dynamic_base="proportional", dynamic_strength=2.0), sizes)
    close(mixer2.update({"a": 1.0, "b": 3.0}), {"a": 0.25, "b": 0.75})
    # strength 0 keeps the base; a task without a loss keeps factor 1
    mixer0 = DynamicMixer(MixingConfig(policy="dynamic", dynamic_base="uniform", dynamic_strength=0.0), sizes)
    close(mixer0.update({"a": 1.0, "b": 3.0}), {"a": 0.5, "b": 0.5})
    three = DynamicMixer(MixingConfig(policy="dynamic", dynamic_base="uniform"), {"a": 1, "b": 1, "c": 1})
    # losses a=1, b=3 (mean 2), c unseen -> weights 1/3*.5, 1/3*1.5, 1/3*1 -> /1
    close(three.update({"a": 1.0, "b": 3.0}), {"a": 0.5 / 3, "b": 1.5 / 3, "c": 1 / 3})
    with pytest.raises(TasktuneError, match="zzz"):
        three.update({"zzz": 1.0})


def test_empty_task_is_an_error() -> None:
    with pytest.raises(TasktuneError, match="slots"):
        mixing_rates(MixingConfig(), {"intent": 5, "slots": 0})
