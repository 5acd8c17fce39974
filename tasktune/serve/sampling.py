"""Per-request decoding parameters and the sampler.

Greedy rows take the argmax. Sampled rows use temperature and nucleus (top-p) filtering
and draw with their own `torch.Generator`, so a request with a seed produces the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator seeded from the request's seed (or a random one); None for greedy."""
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return g


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs: [V] -> probs with the tail outside the smallest set of mass >= top_p zeroed."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the top token
    return torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """logits: [B, V] float32 -> one token per row."""
    out = logits.argmax(dim=-1).tolist()
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        row = logits[i]
        # subtract the max first: a tiny temperature then gives -inf, never inf - inf = nan
        probs = top_p_filter(torch.softmax((row - row.max()) / p.temperature, dim=-1), p.top_p)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            continue  # degenerate distribution (non-finite logits): keep the argmax
        out[i] = int(torch.multinomial(probs, 1, generator=g).item())
    return out
