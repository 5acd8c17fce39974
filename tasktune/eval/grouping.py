"""Which tasks should share an adapter: clustering the task-affinity matrix.

Input is Z[i][j] from transfer.task_affinity (Fifty et al. 2021): how much a step on task
j helps task i. Grouping wants one symmetric similarity, so S = (Z + Z^T) / 2 (two tasks
belong together when they help each other on average); the diagonal (a task's effect on
itself) says nothing about grouping and is ignored.

Distance: D[i][j] = max_{a != b} S[a][b] - S[i][j] off the diagonal, 0 on it: non-negative
for the negative affinities Z often holds, and the most affine pair is at distance 0.
Clustering: scikit-learn's agglomerative clustering on D with average linkage (UPGMA):
it accepts any precomputed distance (Ward does not), merges by mean pairwise affinity,
which is what "tasks in a group help each other" means, and has no randomness, so the
grouping is deterministic. `seed` is accepted for a randomised method behind the same
call (spectral) and unused by this one.

Choosing k (k=None): the k in 2..n-1 with the highest silhouette score on D (the first
one on ties). Silhouette needs 2 <= k <= n-1, so n <= 2 is decided directly: one task is
one group; two tasks share a group when S[0][1] > 0 (they help each other on average)
and are split otherwise.

Output order is deterministic: tasks within a group in input order, groups by their
first task.
"""

from __future__ import annotations

import numpy as np

from tasktune.errors import TasktuneError


def symmetric_affinity(affinity: dict[str, dict[str, float]]) -> tuple[list[str], np.ndarray]:
    """Tasks in input order and S = (Z + Z^T) / 2: [n, n]. Every row must name every task."""
    tasks = list(affinity)
    if not tasks:
        raise TasktuneError("task grouping needs at least one task in the affinity matrix")
    Z = np.zeros((len(tasks), len(tasks)))
    for i, a in enumerate(tasks):
        for j, b in enumerate(tasks):
            if i != j and b not in affinity[a]:
                raise TasktuneError(f"affinity matrix has no entry Z[{a!r}][{b!r}]; every pair of tasks is needed")
            Z[i, j] = float(affinity[a].get(b, 0.0))
    if not np.isfinite(Z).all():
        raise TasktuneError("affinity matrix has non-finite entries")
    return tasks, (Z + Z.T) / 2


def affinity_distance(S: np.ndarray) -> np.ndarray:
    """D = max off-diagonal S - S, zero diagonal: [n, n], symmetric, >= 0."""
    n = S.shape[0]
    off = ~np.eye(n, dtype=bool)
    D = np.where(off, S[off].max() - S, 0.0) if n > 1 else np.zeros((n, n))
    return D


def _cluster(D: np.ndarray, k: int) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering

    n = D.shape[0]
    if k == n:
        return np.arange(n)
    if k == 1:
        return np.zeros(n, dtype=int)
    return AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(D)


def _groups(tasks: list[str], labels: np.ndarray) -> list[list[str]]:
    """Labels -> groups, tasks in input order, groups ordered by their first task."""
    by_label: dict[int, list[str]] = {}
    for task, label in zip(tasks, labels.tolist()):
        by_label.setdefault(label, []).append(task)
    return list(by_label.values())


def choose_k(D: np.ndarray) -> tuple[int, dict[int, float]]:
    """The k in 2..n-1 with the best silhouette on D (n >= 3), and every k's score."""
    from sklearn.metrics import silhouette_score

    n = D.shape[0]
    scores = {k: float(silhouette_score(D, _cluster(D, k), metric="precomputed")) for k in range(2, n)}
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, scores


def group_tasks(affinity: dict[str, dict[str, float]], k: int | None = None, seed: int = 0) -> list[list[str]]:
    """Tasks clustered into k groups (k=None: chosen by silhouette); each task appears in
    exactly one group. See the module docstring for the similarity, distance and rules."""
    del seed  # agglomerative clustering is deterministic
    tasks, S = symmetric_affinity(affinity)
    n = len(tasks)
    if k is not None and not 1 <= k <= n:
        raise TasktuneError(f"cannot split {n} task(s) into {k} groups; choose k between 1 and {n}")
    if k is None:
        if n == 1:
            return [tasks]
        if n == 2:
            return [tasks] if S[0, 1] > 0 else [[t] for t in tasks]
        k, _ = choose_k(affinity_distance(S))
    return _groups(tasks, _cluster(affinity_distance(S), k))
