"""The mixture sampler: empirical rates, without-replacement passes, exact resume."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tasktune.config import CurriculumStage, MixingConfig
from tasktune.data.mixing import mixing_rates
from tasktune.data.sampler import MixtureSampler
from tasktune.errors import TasktuneError

SIZES = {"intent": 6000, "slots": 2000, "yesno": 700, "summ": 300}


@pytest.mark.parametrize(
    "cfg",
    [
        MixingConfig(policy="proportional"),
        MixingConfig(policy="temperature", temperature=3.0),
        MixingConfig(policy="capped", cap=1000),
        MixingConfig(policy="uniform"),
    ],
    ids=lambda c: c.policy,
)
def test_empirical_rates_match_closed_form(cfg) -> None:
    n = 100_000
    counts = Counter(name for name, _ in MixtureSampler(SIZES, cfg, seed=1).draw(n))
    expected = mixing_rates(cfg, SIZES)
    for name, rate in expected.items():
        assert abs(counts[name] / n - rate) < 0.005, (name, counts[name] / n, rate)


def test_without_replacement_within_a_pass_and_reshuffled() -> None:
    sizes = {"a": 7, "b": 5}
    sampler = MixtureSampler(sizes, MixingConfig(policy="uniform"), seed=3)
    per_task: dict[str, list[int]] = {"a": [], "b": []}
    for name, idx in sampler.draw(400):
        per_task[name].append(idx)
    for name, n in sizes.items():
        seq = per_task[name]
        passes = [seq[i : i + n] for i in range(0, len(seq) - n + 1, n)]
        assert len(passes) >= 10
        for p in passes:  # every full pass is a permutation of 0..n-1
            assert sorted(p) == list(range(n))
        assert len({tuple(p) for p in passes}) > 1  # reshuffled between passes


def test_same_seed_same_sequence_different_seed_different() -> None:
    cfg = MixingConfig(policy="temperature")
    a = MixtureSampler(SIZES, cfg, seed=7).draw(2000)
    b = MixtureSampler(SIZES, cfg, seed=7).draw(2000)
    c = MixtureSampler(SIZES, cfg, seed=8).draw(2000)
    assert a == b
    assert a != c
    assert [t for t, _ in a] != [t for t, _ in c]  # the task draws differ, not only the permutations


def test_resume_continues_with_exactly_the_same_draws() -> None:
    cfg = MixingConfig(policy="proportional")
    sizes = {"intent": 60, "slots": 25, "yesno": 9}  # small: many passes and reshuffles in 1500 draws
    run = MixtureSampler(sizes, cfg, seed=11)
    run.draw(1000)
    state = json.loads(json.dumps(run.state_dict()))  # survives a JSON round trip
    expected = run.draw(500)
    resumed = MixtureSampler(sizes, cfg, seed=11)
    resumed.load_state_dict(state)
    assert resumed.draw(500) == expected
    fresh = MixtureSampler(sizes, cfg, seed=11)
    assert fresh.draw(500) != expected  # the state really carried something


def test_resume_rejects_other_tasks() -> None:
    state = MixtureSampler({"a": 3}, MixingConfig(), seed=0).state_dict()
    with pytest.raises(TasktuneError, match="does not match"):
        MixtureSampler({"a": 4}, MixingConfig(), seed=0).load_state_dict(state)


def test_curriculum_set_step_switches_rates() -> None:
    cfg = MixingConfig(
        policy="curriculum",
        stages=[
            CurriculumStage(steps=10, policy="explicit", rates={"a": 1, "b": 0}),
            CurriculumStage(steps=10, policy="explicit", rates={"a": 0, "b": 1}),
        ],
    )
    sampler = MixtureSampler({"a": 5, "b": 5}, cfg, seed=0)
    assert {t for t, _ in sampler.draw(200)} == {"a"}
    sampler.set_step(10)
    assert {t for t, _ in sampler.draw(200)} == {"b"}
    state = sampler.state_dict()
    resumed = MixtureSampler({"a": 5, "b": 5}, cfg, seed=0)
    resumed.load_state_dict(state)
    assert resumed.rates == {"a": 0.0, "b": 1.0}


def test_dynamic_update_losses_moves_the_draws() -> None:
    cfg = MixingConfig(policy="dynamic", dynamic_base="uniform", dynamic_strength=1.0)
    sampler = MixtureSampler({"a": 100, "b": 100}, cfg, seed=0)
    assert sampler.update_losses({"a": 1.0, "b": 3.0}) == pytest.approx({"a": 0.25, "b": 0.75})
    counts = Counter(t for t, _ in sampler.draw(20_000))
    assert abs(counts["b"] / 20_000 - 0.75) < 0.01
    resumed = MixtureSampler({"a": 100, "b": 100}, cfg, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    assert resumed.rates == pytest.approx({"a": 0.25, "b": 0.75})
    assert resumed.draw(100) == sampler.draw(100)
    # other policies ignore losses (a loop may call update_losses unconditionally)
    static = MixtureSampler({"a": 1, "b": 3}, MixingConfig(), seed=0)
    assert static.update_losses({"a": 1.0, "b": 9.0, "other_task": 2.0}) == {"a": 0.25, "b": 0.75}
    assert sampler.update_losses({"a": 3.0, "b": 3.0, "other_task": 100.0}) == pytest.approx({"a": 0.5, "b": 0.5})


def test_shards_of_ranks_make_up_the_one_process_batch() -> None:
    """W ranks drawing shards of b see together exactly the W*b draws of one process, and
    keep the same state (so rank 0's checkpoint resumes every rank)."""
    cfg, world, b = MixingConfig(policy="temperature", temperature=2.0), 3, 4
    one = MixtureSampler(SIZES, cfg, seed=5)
    ranks = [MixtureSampler(SIZES, cfg, seed=5) for _ in range(world)]
    for _ in range(10):
        shards = [s.draw_shard(b, rank, world) for rank, s in enumerate(ranks)]
        assert all(len(shard) == b for shard in shards)
        assert sorted(d for shard in shards for d in shard) == sorted(one.draw(world * b))
    assert all(s.state_dict() == one.state_dict() for s in ranks)
