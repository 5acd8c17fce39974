"""A deterministic, resumable sampler over a mixture of tasks.

Each draw picks a task from the current mixing rates, then the next example of that
task. Within a task, examples are visited in a seeded permutation without replacement;
when a pass ends the task is reshuffled with a fresh permutation. A run resumed from
`state_dict()` continues with exactly the draws the uninterrupted run would have made.

Why this design: the task draw uses one numpy PCG64 generator whose state is saved;
the per-task permutations are not saved at all but recomputed from (seed, task, pass),
so the state stays small (a few ints per task) however large the tasks are. Rates are
looked up at each draw (a uniform number against the cumulative rates), so changing the
rates (curriculum step, dynamic losses) never disturbs the random stream itself.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from tasktune.config import MixingConfig
from tasktune.data.mixing import DynamicMixer, mixing_rates
from tasktune.errors import TasktuneError


def _task_key(name: str) -> int:
    """A stable 64-bit key per task name (Python's hash() changes between runs)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


@dataclass
class _Cursor:
    """Where a task is: which pass over its examples, and how far into it."""

    epoch: int = 0
    pos: int = 0


class MixtureSampler:
    """Yields (task_name, example_index) forever.

    sizes: examples per task (order fixes the order of rates); cfg: the mixing policy;
    seed: the run seed. `set_step` moves a curriculum along; `update_losses` feeds the
    dynamic policy.
    """

    def __init__(self, sizes: dict[str, int], cfg: MixingConfig, seed: int = 0):
        self.sizes = dict(sizes)
        self.cfg = cfg
        self.seed = int(seed)
        self.names = list(self.sizes)
        self.step = 0
        self.draws = 0
        self._rng = np.random.Generator(np.random.PCG64([self.seed, 0x5A3D]))
        self._cursors = {name: _Cursor() for name in self.names}
        self._perms: dict[str, tuple[int, np.ndarray]] = {}  # task -> (epoch, permutation)
        self._mixer = DynamicMixer(cfg, self.sizes) if cfg.policy == "dynamic" else None
        self._set_rates(mixing_rates(cfg, self.sizes, 0) if self._mixer is None else self._mixer.rates)

    # ----- rates -------------------------------------------------------------------------
    def _set_rates(self, rates: dict[str, float]) -> None:
        self.rates = {name: rates[name] for name in self.names}
        cum, total = [], 0.0
        for name in self.names:
            total += self.rates[name]
            cum.append(total)
        cum[-1] = float("inf")  # float round-off must never push a draw past the last task
        self._cum = cum

    def set_step(self, step: int) -> None:
        """Tell the sampler the training step (curriculum policies change rates with it)."""
        self.step = int(step)
        if self.cfg.policy == "curriculum":
            self._set_rates(mixing_rates(self.cfg, self.sizes, self.step))

    def update_losses(self, val_losses: dict[str, float]) -> dict[str, float]:
        """Feed validation losses to the dynamic policy; returns the (new) rates.

        A no-op for every other policy, so a training loop may call it unconditionally
        after each validation. Losses of tasks this sampler does not draw (validation
        over more tasks than a single-task run trains) are ignored."""
        if self._mixer is not None:
            self._set_rates(self._mixer.update({k: v for k, v in val_losses.items() if k in self.sizes}))
        return dict(self.rates)

    # ----- drawing -----------------------------------------------------------------------
    def _permutation(self, name: str, epoch: int) -> np.ndarray:
        cached = self._perms.get(name)
        if cached is None or cached[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, _task_key(name), epoch]))
            cached = (epoch, rng.permutation(self.sizes[name]))
            self._perms[name] = cached
        return cached[1]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return self

    def __next__(self) -> tuple[str, int]:
        name = self.names[bisect_right(self._cum, self._rng.random())]
        cur = self._cursors[name]
        index = int(self._permutation(name, cur.epoch)[cur.pos])
        cur.pos += 1
        if cur.pos == self.sizes[name]:
            cur.epoch, cur.pos = cur.epoch + 1, 0
        self.draws += 1
        return name, index

    def draw(self, n: int) -> list[tuple[str, int]]:
        return [next(self) for _ in range(n)]

    def draw_shard(self, per_rank: int, rank: int = 0, world: int = 1) -> list[tuple[str, int]]:
        """Draw a global batch of world x per_rank examples and return rank's share (every
        world-th draw from draw `rank` on). Every rank of a data-parallel run calls this
        with the same arguments, so all ranks keep the same sampler state and together
        see exactly the batch one process would draw with `draw(world * per_rank)`."""
        return self.draw(world * per_rank)[rank::world]

    # ----- resuming ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (ints, strings, lists, and the dynamic losses as floats)."""
        rng = self._rng.bit_generator.state
        return {
            "seed": self.seed,
            "step": self.step,
            "draws": self.draws,
            "sizes": [[name, self.sizes[name]] for name in self.names],
            "cursors": [[name, c.epoch, c.pos] for name, c in self._cursors.items()],
            "rng": [int(rng["state"]["state"]), int(rng["state"]["inc"]), int(rng["has_uint32"]), int(rng["uinteger"])],
            "losses": [[k, v] for k, v in (self._mixer.losses.items() if self._mixer else [])],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the tasks and their sizes must be the ones it was saved with."""
        saved = {name: int(n) for name, n in state["sizes"]}
        if saved != self.sizes or int(state["seed"]) != self.seed:
            raise TasktuneError(
                f"sampler state does not match this run: saved seed {state['seed']} and task sizes {saved}, "
                f"this run has seed {self.seed} and {self.sizes}"
            )
        self.draws = int(state["draws"])
        self._cursors = {name: _Cursor(int(e), int(p)) for name, e, p in state["cursors"]}
        s, inc, has32, uint = state["rng"]
        self._rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": int(s), "inc": int(inc)},
            "has_uint32": int(has32),
            "uinteger": int(uint),
        }
        if self._mixer is not None:
            self._mixer.losses = {k: float(v) for k, v in state.get("losses", [])}
            self._set_rates(self._mixer.rates)
        self.set_step(int(state["step"]))
