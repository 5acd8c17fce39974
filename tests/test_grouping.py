"""Task grouping from an affinity matrix: obvious blocks are found, with and without k."""

from __future__ import annotations

import numpy as np
import pytest

from tasktune.errors import TasktuneError
from tasktune.eval.grouping import affinity_distance, group_tasks, symmetric_affinity

TASKS = ["intent", "domain", "sentiment", "slots", "ner"]
BLOCKS = [["intent", "domain", "sentiment"], ["slots", "ner"]]


def two_blocks(seed=0) -> dict[str, dict[str, float]]:
    """Tasks help their own block (~0.3), hurt the other (~-0.1); asymmetric noise."""
    rng = np.random.default_rng(seed)
    block = {t: b for b, members in enumerate(BLOCKS) for t in members}
    return {
        i: {j: (0.3 if block[i] == block[j] else -0.1) + float(rng.normal(0, 0.03)) for j in TASKS} for i in TASKS
    }


@pytest.mark.parametrize("k", [2, None])
def test_two_obvious_blocks_are_found(k):
    assert group_tasks(two_blocks(), k=k) == BLOCKS


def test_every_task_once_for_every_k_and_deterministic():
    z = two_blocks(seed=1)
    for k in range(1, len(TASKS) + 1):
        groups = group_tasks(z, k=k)
        assert len(groups) == k
        assert sorted(t for g in groups for t in g) == sorted(TASKS)
        assert group_tasks(z, k=k) == groups
    assert group_tasks(z, k=len(TASKS)) == [[t] for t in TASKS]


def test_symmetrised_and_distance():
    z = {"a": {"a": 9.0, "b": 0.4}, "b": {"a": 0.0, "b": 9.0}}
    tasks, S = symmetric_affinity(z)
    assert tasks == ["a", "b"] and S[0, 1] == S[1, 0] == pytest.approx(0.2)
    D = affinity_distance(S)
    assert (np.diag(D) == 0).all() and (D >= 0).all() and (D == D.T).all()


def test_small_task_counts():
    assert group_tasks({"a": {"a": 1.0}}) == [["a"]]
    helps = {"a": {"b": 0.2}, "b": {"a": 0.1}}
    hurts = {"a": {"b": 0.2}, "b": {"a": -0.5}}
    assert group_tasks(helps) == [["a", "b"]]
    assert group_tasks(hurts) == [["a"], ["b"]]


def test_clear_errors():
    with pytest.raises(TasktuneError, match="into 6 groups"):
        group_tasks(two_blocks(), k=6)
    with pytest.raises(TasktuneError, match="into 0 groups"):
        group_tasks(two_blocks(), k=0)
    with pytest.raises(TasktuneError, match="no entry"):
        group_tasks({"a": {"b": 0.1}, "b": {}})
