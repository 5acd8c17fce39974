"""Per-request decoding parameters, the logits processors and the sampler.

Greedy rows take the argmax. Sampled rows use temperature and nucleus (top-p) filtering
and draw with their own `torch.Generator`, so a request with a seed produces the same
tokens whatever else shares its batch. Presence and frequency penalties (OpenAI's, over
the tokens generated so far, as vLLM applies them) and a logit bias shape a row's logits
before either. Log-probabilities are of the model's raw distribution (vLLM's default
`raw_logprobs`): what the model said, not what the processors made of it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20  # alternatives a token (vLLM's default max_logprobs)
LOGPROB_FLOOR = -9999.0  # -inf has no JSON form (vLLM clamps to the same)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2]")
        if any(t < 0 or not -100 <= b <= 100 for t, b in self.logit_bias):
            raise ValueError("logit_bias needs token ids >= 0 and biases in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def shapes_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def argmax_only(self) -> bool:
        """The token is the raw argmax and nothing else is read: the engine's device-side
        greedy path (the fused LM head's argmax, steps launched ahead) serves the row."""
        return self.greedy and not self.shapes_logits and self.logprobs is None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the `logprobs` most likely tokens' (most
    likely first; the chosen token appears there only if it is among them)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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


def shape_logits(row: torch.Tensor, params: SamplingParams, generated: list[int]) -> torch.Tensor:
    """row [V] float32 -> a copy with the request's penalties and logit bias applied:
    logit - frequency * count - presence * (count > 0), plus the bias (OpenAI's formula)."""
    row = row.clone()
    V = row.shape[0]
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated, device=row.device), minlength=V)[:V].to(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)
    for token, bias in params.logit_bias:
        if token < V:  # (the API checks ids against the vocabulary)
            row[token] += bias
    return row


def logprobs_of(logits: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """logits [n, V] float32, the chosen token and k of each row -> its TokenLogprob, from
    one log-softmax and one top-k on the device, read back in one transfer."""
    lp = torch.log_softmax(logits, dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0]
    k = max(ks)
    if k:
        top_lp, top_ids = lp.topk(k, dim=-1)
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    out = []
    for i, (t, c) in enumerate(zip(tokens, chosen.tolist())):
        top = tuple((top_ids[i][j], _finite(top_lp[i][j])) for j in range(ks[i])) if k else ()
        out.append(TokenLogprob(t, _finite(c), top))
    return out


def _finite(x: float) -> float:
    return x if math.isfinite(x) and x > LOGPROB_FLOOR else LOGPROB_FLOOR


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           generated: list[list[int]] | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [B, V] float32 -> one token per row, and its log-probabilities where the
    row's request asked for them (else None). generated: each row's tokens so far (the
    penalties count them)."""
    generated = generated if generated is not None else [[] for _ in params]
    shaped = {i: shape_logits(logits[i], p, generated[i]) for i, p in enumerate(params) if p.shapes_logits}
    out = logits.argmax(dim=-1).tolist()
    for i, row in shaped.items():
        out[i] = int(row.argmax())
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        row = shaped.get(i, logits[i])
        # subtract the max first: a tiny temperature then gives -inf, never inf - inf = nan
        probs = top_p_filter(torch.softmax((row - row.max()) / p.temperature, dim=-1), p.top_p)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            continue  # degenerate distribution (non-finite logits): keep the argmax
        out[i] = int(torch.multinomial(probs, 1, generator=g).item())
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    lps: list[TokenLogprob | None] = [None] * len(params)
    if want:
        index = torch.tensor(want, device=logits.device)
        found = logprobs_of(logits.index_select(0, index).float(), [out[i] for i in want],
                            [params[i].logprobs for i in want])
        for i, lp in zip(want, found):
            lps[i] = lp
    return out, lps
