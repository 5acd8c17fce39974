"""Mixing policies: how often each task is drawn when tasks are trained together.

Every policy is a closed form over the task sizes n_i (training examples per task), so a
test can check it against hand-computed numbers and a reader can see what a config does:

    proportional   r_i = n_i / sum_j n_j                       (T5 "examples-proportional")
    capped         r_i = min(n_i, K) / sum_j min(n_j, K)        (T5's K = `cap`: large tasks stop
                                                                 drowning small ones)
    temperature    r_i = p_i^(1/T) / sum_j p_j^(1/T)            (T5/mT5; p_i the proportional
                                                                 rate; T=1 is proportional,
                                                                 T -> inf is uniform)
    uniform        r_i = 1 / N
    explicit       r_i = w_i / sum_j w_j                        (`rates`, one weight per task)
    curriculum     the policy of the stage that `step` falls in (stages run back to back;
                   past the last stage the last one stays)
    dynamic        r_i = base_i * (L_i / mean_j L_j)^s / Z      (see `DynamicMixer`)

Rates always sum to 1 and are returned in the order of `sizes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tasktune.config import CurriculumStage, MixingConfig
from tasktune.errors import TasktuneError


def _normalise(weights: dict[str, float], what: str) -> dict[str, float]:
    total = sum(weights.values())
    if not total > 0:
        raise TasktuneError(f"mixing: the {what} weights sum to {total}; at least one task needs a positive weight")
    return {name: w / total for name, w in weights.items()}


def _check_sizes(sizes: dict[str, int]) -> None:
    if not sizes:
        raise TasktuneError("mixing: no tasks to mix")
    for name, n in sizes.items():
        if n <= 0:
            raise TasktuneError(f"mixing: task '{name}' has no training examples ({n}); it cannot be sampled")


def proportional_rates(sizes: dict[str, int]) -> dict[str, float]:
    return _normalise({k: float(n) for k, n in sizes.items()}, "proportional")


def capped_rates(sizes: dict[str, int], cap: int) -> dict[str, float]:
    if cap <= 0:
        raise TasktuneError(f"mixing: cap K must be positive, got {cap}")
    return _normalise({k: float(min(n, cap)) for k, n in sizes.items()}, "capped")


def temperature_rates(sizes: dict[str, int], temperature: float) -> dict[str, float]:
    if not temperature > 0:
        raise TasktuneError(f"mixing: temperature must be positive, got {temperature}")
    p = proportional_rates(sizes)
    return _normalise({k: v ** (1.0 / temperature) for k, v in p.items()}, "temperature")


def uniform_rates(sizes: dict[str, int]) -> dict[str, float]:
    return {k: 1.0 / len(sizes) for k in sizes}


def explicit_rates(sizes: dict[str, int], rates: dict[str, float] | None) -> dict[str, float]:
    """`rates` must name every task and nothing else; weights are normalised, so
    {a: 2, b: 1} means a is drawn twice as often as b."""
    if not rates:
        raise TasktuneError("mixing: policy 'explicit' needs `rates:` with one weight per task")
    unknown = sorted(set(rates) - set(sizes))
    if unknown:
        raise TasktuneError(f"mixing: `rates` names unknown task(s) {unknown}; tasks are {sorted(sizes)}")
    missing = [k for k in sizes if k not in rates]
    if missing:
        raise TasktuneError(f"mixing: `rates` has no weight for task(s) {missing}")
    for name, w in rates.items():
        if not (w >= 0 and math.isfinite(w)):
            raise TasktuneError(f"mixing: rate for task '{name}' must be a finite number >= 0, got {w}")
    return _normalise({k: float(rates[k]) for k in sizes}, "explicit")


def _static_rates(policy: str, sizes: dict[str, int], temperature: float, cap: int, rates) -> dict[str, float]:
    if policy == "proportional":
        return proportional_rates(sizes)
    if policy == "capped":
        return capped_rates(sizes, cap)
    if policy == "temperature":
        return temperature_rates(sizes, temperature)
    if policy == "uniform":
        return uniform_rates(sizes)
    if policy == "explicit":
        return explicit_rates(sizes, rates)
    raise TasktuneError(f"mixing: unknown policy '{policy}'")


def curriculum_stage(stages: list[CurriculumStage], step: int) -> int:
    """Index of the stage `step` (0-based) falls in; stages run back to back and the last
    stage stays in force after its steps run out."""
    if not stages:
        raise TasktuneError("mixing: policy 'curriculum' needs `stages:` (each with `steps` and a policy)")
    end = 0
    for i, stage in enumerate(stages):
        end += stage.steps
        if step < end:
            return i
    return len(stages) - 1


def mixing_rates(cfg: MixingConfig, sizes: dict[str, int], step: int = 0) -> dict[str, float]:
    """Sampling rate per task at training step `step` (only curriculum depends on it).

    For `dynamic` this returns the base rates (no validation loss seen yet); the live
    rates come from a `DynamicMixer`.
    """
    _check_sizes(sizes)
    if cfg.policy == "curriculum":
        stages = cfg.stages or []
        stage = stages[curriculum_stage(stages, step)]
        return _static_rates(stage.policy, sizes, stage.temperature, stage.cap, stage.rates)
    if cfg.policy == "dynamic":
        return _static_rates(cfg.dynamic_base, sizes, cfg.temperature, cfg.cap, None)
    return _static_rates(cfg.policy, sizes, cfg.temperature, cfg.cap, cfg.rates)


@dataclass
class DynamicMixer:
    """Raises the rate of tasks whose validation loss lags behind the others.

        r_i = base_i * (L_i / mean_j L_j)^s / Z

    base_i: the `cfg.dynamic_base` policy's rate (proportional, uniform or temperature);
    L_i: task i's latest validation loss; s = `cfg.dynamic_strength` (0 keeps the base
    rates; 1 scales linearly with the relative loss); Z normalises to 1. A task whose
    loss is twice the mean is drawn 2^s times as often as its base rate (before
    normalisation). Tasks without a (finite) loss keep factor 1, so a task that was not
    validated is neither favoured nor starved. Only loss ratios matter, so the rule is
    the same whatever the loss scale.
    """

    cfg: MixingConfig
    sizes: dict[str, int]
    losses: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_sizes(self.sizes)
        self.base = _static_rates(self.cfg.dynamic_base, self.sizes, self.cfg.temperature, self.cfg.cap, None)

    def update(self, val_losses: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(val_losses) - set(self.sizes))
        if unknown:
            raise TasktuneError(f"mixing: validation loss for unknown task(s) {unknown}")
        self.losses.update({k: float(v) for k, v in val_losses.items()})
        return self.rates

    @property
    def rates(self) -> dict[str, float]:
        seen = {k: v for k, v in self.losses.items() if math.isfinite(v) and v >= 0}
        mean = sum(seen.values()) / len(seen) if seen else 0.0
        s = self.cfg.dynamic_strength
        weights = {}
        for name, base in self.base.items():
            factor = (seen[name] / mean) ** s if name in seen and mean > 0 else 1.0
            weights[name] = base * factor
        return _normalise(weights, "dynamic")
