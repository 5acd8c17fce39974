"""Per-request decoding parameters, the logits processors and the sampler.

Greedy rows take the argmax. Sampled rows use temperature, then top-k, min-p and nucleus
(top-p) filtering (vLLM's order); where Triton runs, rows without penalties or answers (and top-k with
top-p only up to triton_top_k.TOP_K) draw on the device (triton_sample, keyed by seed and position),
the others with their own `torch.Generator`, so a request
with a seed produces the same tokens whatever else shares its batch. Before either, in vLLM's order:
a logit bias and min_tokens (end tokens barred until then), then the repetition penalty
(Hugging Face's and vLLM's, over prompt and output) and OpenAI's presence and frequency
penalties (over the output); last, a row bound to answers (guided.py) or a grammar
(grammar.py) keeps only the tokens that continue it. Log-probabilities are of the model's raw distribution
(vLLM's default `raw_logprobs`): what the model said, not what the processors made of it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tasktune.serve import triton_top_k
from tasktune.serve.grammar import mask_rows
from tasktune.serve.triton_sample import sample_rows
from tasktune.serve.guided import constrain_rows

# Sampled rows draw together (`draw`: one batch of filters, the exponential race, no wait of
# their own); False: one row at a time through torch.multinomial, three waits for the device a
# row (as up to session 16; the serve bench's variant `sampled_per_row` times it)
BATCHED_SAMPLING = True
MAX_LOGPROBS = 20  # alternatives a token (vLLM's default max_logprobs)
LOGPROB_FLOOR = -9999.0  # -inf has no JSON form (vLLM clamps to the same)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    include_stop_str_in_output: bool = False  # vLLM's: the stop string that ended the text stays in it
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    top_k: int = 0  # sample among the k most likely (0 or -1: all)
    min_p: float = 0.0  # drop tokens below min_p x the most likely one's probability
    repetition_penalty: float = 1.0  # a seen token's logit / p if positive, else x p
    min_tokens: int = 0  # end tokens and stop_token_ids barred before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # generating one ends the request, like an end token
    # None: none; k: each prompt token's log-probability given the tokens before it (the
    # first token's is None) and the k most likely there (vLLM's prompt_logprobs, OpenAI's echo)
    prompt_logprobs: int | None = None
    # vLLM's: only the prompt's last k tokens (left truncation; -1: as many as the server takes)
    truncate_prompt_tokens: int | None = None
    # the answer must be one of these token sequences (guided.py; vLLM's guided_choice); () = any text
    choices: tuple[tuple[int, ...], ...] = ()
    # ... or a match of this compiled grammar (grammar.py: a JSON schema, any JSON, a regex)
    grammar: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0 (0: the prompt only, e.g. to score it)")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2]")
        if any(t < 0 or not -100 <= b <= 100 for t, b in self.logit_bias):
            raise ValueError("logit_bias needs token ids >= 0 and biases in [-100, 100]")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1:
            raise ValueError("truncate_prompt_tokens must be >= 1, or -1 for as many as the server takes")
        if self.top_k < -1:
            raise ValueError("top_k must be >= 1, or 0 or -1 for all tokens")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError("repetition_penalty must be in (0, 2]")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be >= 0")
        if any(not c or min(c) < 0 for c in self.choices):
            raise ValueError("choices must be non-empty token sequences of ids >= 0")
        if self.choices and (self.min_tokens or self.ignore_eos):
            raise ValueError("choices cannot be combined with min_tokens or ignore_eos (an answer ends at its last token)")
        if self.grammar is not None and (self.choices or self.min_tokens or self.ignore_eos):
            raise ValueError("a grammar cannot be combined with choices, min_tokens or ignore_eos (a match ends "
                             "where the grammar does)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalizes(self) -> bool:
        """A bias, min_tokens or a penalty changes the row's logits (shape_logits, one row at a time)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.min_tokens
                    or self.repetition_penalty != 1)

    @property
    def shapes_logits(self) -> bool:
        return self.penalizes or bool(self.choices) or self.grammar is not None

    @property
    def device_greedy(self) -> bool:
        """The token is the raw argmax: the engine's device-side greedy path (the fused LM
        head's argmax, steps launched ahead, log-probabilities copied back with the tokens)
        serves the row."""
        return self.greedy and not self.shapes_logits

    @property
    def device_sample(self) -> bool:
        """Sampled with temperature, min-p, top-p and top-k (and maybe a grammar): the
        device-side draw (triton_sample) serves the row; top-k above triton_top_k.TOP_K
        with top-p (top-p over what top-k kept: the draw takes it only from its top-k
        candidates), penalties and answers take the logits."""
        return (not self.greedy and not self.penalizes and not self.choices
                and (self.top_k <= 0 or self.top_p >= 1 or self.top_k <= triton_top_k.TOP_K))

    @property
    def grammar_greedy(self) -> bool:
        """Greedy under a grammar and nothing else that shapes the logits: the argmax of the
        raw logits masked by the grammar, which the device-side path makes too (its steps
        launched ahead stop at the logits until the masks are filled: DecodeStep.greedy)."""
        return self.greedy and self.grammar is not None and not self.penalizes and not self.choices


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the `logprobs` most likely tokens' (most
    likely first; the chosen token appears there only if it is among them)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # the token's place in the vocabulary, most likely 1 (vLLM's; prompt tokens only)

    @classmethod
    def from_row(cls, token: int, row: list[float], k: int, rank: int | None = None) -> "TokenLogprob":
        """A row of `logprob_table` -> this token's entry with its k most likely alternatives."""
        K = (len(row) - 1) // 2
        return cls(token, _finite(row[0]), tuple((int(row[1 + K + j]), _finite(row[1 + j])) for j in range(k)), rank)


def logprob_table(logits: torch.Tensor, tokens: torch.Tensor, k: int = MAX_LOGPROBS) -> torch.Tensor:
    """logits [n, V], tokens [n] -> [n, 1 + 2k] float32 on their device: each row's token's
    log-probability, its k most likely tokens' log-probabilities, then their ids (as
    floats, exact below 2**24). One tensor, so one copy takes it to the host, with no wait
    where the engine copies it behind a step's tokens."""
    x = logits.float()
    k = min(k, x.shape[-1])
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    chosen = x.gather(1, tokens.view(-1, 1).to(torch.long)) - lse
    if not k:
        return chosen
    top = x.max(dim=-1, keepdim=True) if k == 1 else x.topk(k, dim=-1)  # (max: 10x topk's speed on an H200)
    return torch.cat([chosen, top.values - lse, top.indices.to(torch.float32)], dim=1)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator seeded from a seeded request's seed; None for greedy and for unseeded
    requests, which draw from torch's default generator, all rows in one call (`draw`)."""
    if params.greedy or params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed)
    return g


def shape_logits(row: torch.Tensor, params: SamplingParams, generated: list[int], prompt: list[int] = (),
                 end_ids: Collection[int] = ()) -> torch.Tensor:
    """row [V] float32 -> a copy with the request's processors applied, in vLLM's order: the
    logit bias; end_ids and stop_token_ids at -inf while fewer than min_tokens were
    generated; the repetition penalty over prompt and output; then OpenAI's
    logit - frequency * count - presence * (count > 0) over the output; last, a row bound to
    `choices` keeps only the tokens that continue one (guided.py)."""
    row = row.clone()
    V = row.shape[0]
    for token, bias in params.logit_bias:
        if token < V:  # (the API checks ids against the vocabulary)
            row[token] += bias
    if len(generated) < params.min_tokens:
        barred = [t for t in (*end_ids, *params.stop_token_ids) if t < V]
        row[barred] = float("-inf")
    if params.repetition_penalty != 1 and (generated or prompt):
        seen = torch.tensor(sorted(set(prompt) | set(generated)), device=row.device, dtype=torch.long)
        seen = seen[seen < V]
        old = row[seen]
        row[seen] = torch.where(old > 0, old / params.repetition_penalty, old * params.repetition_penalty)
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated, device=row.device), minlength=V)[:V].to(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)
    if params.choices:
        row = constrain_rows(row[None], [0], [params.choices], [generated], end_ids)[0]
    return row


def sampling_probs(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """row [V] (processed logits) -> the distribution a sampled row draws from, in vocabulary
    order: temperature, then top-k, min-p and top-p (unnormalised; `sampling_probs_rows`)."""
    probs, order = sampling_probs_rows(row[None], [params], params.top_p < 1)
    return probs[0] if order is None else torch.zeros_like(probs[0]).scatter_(0, order[0], probs[0])


def cumsum_rows(x: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """x.cumsum(-1) of [n, V] rows as a scan within chunks of `chunk` columns plus the running
    total of the chunks before: torch's innermost-dim scan gives each long row to one block
    (243 us for 32 x 151,936 floats on an H200, against a sort of 382)."""
    n, V = x.shape
    y = F.pad(x, (0, -V % chunk)).view(n, -1, chunk).cumsum(dim=-1)
    totals = y[..., -1]
    return (y + (totals.cumsum(dim=-1) - totals).unsqueeze(-1)).view(n, -1)[:, :V]


def sampling_probs_rows(rows: torch.Tensor, params: list[SamplingParams], nucleus: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sampling_probs` for many rows at once: rows [n, V], one SamplingParams each -> (probs
    [n, V], None), in a fixed number of launches whatever n. nucleus: the rows ask for top-p;
    their probabilities come back sorted, most likely first, with `order` [n, V] (the token
    of each column), so no scatter puts them back."""
    n, V = rows.shape
    column = lambda values: torch.tensor(values, dtype=rows.dtype).view(n, 1).to(rows.device)  # noqa: E731
    # (a temperature below float32's range would divide by 0: the smallest one it holds acts the same)
    scaled = (rows - rows.max(dim=-1, keepdim=True).values) / column([max(p.temperature, 1e-30) for p in params])
    ks = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    if any(ks):
        kth = scaled.topk(max(ks), dim=-1).values.gather(1, column([max(k, 1) - 1 for k in ks]).long())
        kth = kth.masked_fill(column(ks) == 0, float("-inf"))  # rows without top-k keep everything
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs, order = torch.softmax(scaled, dim=-1), None
    if any(p.min_p > 0 for p in params):  # min-p before top-p, as vLLM applies them
        probs = probs.masked_fill(probs < column([p.min_p for p in params]) * probs.max(dim=-1, keepdim=True).values,
                                  0.0)
    if nucleus:  # the smallest top set holding top_p of what min-p kept (always the top token)
        probs, order = probs.sort(dim=-1, descending=True)
        keep = cumsum_rows(probs) - probs < column([p.top_p for p in params]) * probs.sum(dim=-1, keepdim=True)
        probs = probs * keep
    return probs, order


def draw(rows: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token for each row of processed logits rows [n, V] -> [n] on their device, with no
    wait for it: token = argmax(p / E), E ~ Exp(1) drawn from the row's own generator (the
    exponential race, as vLLM samples: the token is distributed as p, and a seeded request
    draws the same noise whatever rows share its batch; rows without a generator draw from
    torch's default one, together). Rows that ask for top-p race in sorted order, the others
    in vocabulary order: a row's path depends on its own parameters only. A row whose
    distribution is degenerate (non-finite logits) keeps its argmax."""
    out = rows.argmax(dim=-1)
    for nucleus in (False, True):
        group = [j for j, p in enumerate(params) if (p.top_p < 1) == nucleus]
        if not group:
            continue
        index = torch.tensor(group, device=rows.device)
        mine = rows if len(group) == len(params) else rows.index_select(0, index)
        probs, order = sampling_probs_rows(mine, [params[j] for j in group], nucleus)
        noise = torch.empty_like(probs)
        gens = [generators[j] for j in group]
        free = [j for j, g in enumerate(gens) if g is None]  # unseeded rows: one draw for all of them
        if len(free) == len(gens):
            noise.exponential_()
        elif free:
            noise[free] = torch.empty((len(free), probs.shape[1]), device=probs.device).exponential_()
        for j, g in enumerate(gens):
            if g is not None:
                noise[j].exponential_(generator=g)
        picked = (probs / noise).argmax(dim=-1, keepdim=True)
        token = (picked if order is None else order.gather(1, picked)).squeeze(1)
        ok = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
        out = out.index_put((index,), torch.where(ok, token, out.index_select(0, index)))
    return out


def logprobs_of(logits: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """logits [n, V], the chosen token and k of each row -> its TokenLogprob (logprob_table,
    read back in one transfer)."""
    rows = logprob_table(logits, torch.tensor(tokens, device=logits.device), max(ks)).tolist()
    return [TokenLogprob.from_row(t, row, k) for t, row, k in zip(tokens, rows, ks)]


def _finite(x: float) -> float:
    return x if math.isfinite(x) and x > LOGPROB_FLOOR else LOGPROB_FLOOR


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           generated: list[list[int]] | None = None, prompts: list[list[int]] | None = None,
           end_ids: Collection[int] = (), matchers: Sequence | None = None, draws: Sequence | None = None,
           table=None) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [B, V] float32 -> one token per row, and its log-probabilities where the
    row's request asked for them (else None). generated, prompts: each row's tokens so far
    and its prompt (the penalties read them); end_ids: the model's end tokens (min_tokens);
    matchers: each row's grammar matcher, if its request has a grammar (grammar.py; the
    caller lets it accept the token); draws: (KV slot, position) of each row that draws as the
    device-side path does (triton_sample, with its slot's row of `table`), else None: a seeded
    request then draws the same tokens in a batch on this path as on that one."""
    generated = generated if generated is not None else [[] for _ in params]
    prompts = prompts if prompts is not None else [[] for _ in params]
    shaped = {i: shape_logits(logits[i], p, generated[i], prompts[i], end_ids)
              for i, p in enumerate(params) if p.penalizes}
    guided = [i for i, p in enumerate(params) if p.choices and not p.penalizes]
    top = logits.argmax(dim=-1)
    if shaped:
        keys = torch.tensor(list(shaped), device=top.device)
        top = top.index_put((keys,), torch.stack(list(shaped.values())).argmax(-1))
    if guided:  # rows bound to answers and nothing else: masked together
        rows = constrain_rows(logits, guided, [params[i].choices for i in guided], [generated[i] for i in guided],
                              end_ids)
        top = top.index_put((torch.tensor(guided, device=top.device),), rows.argmax(-1))
        shaped.update(zip(guided, rows))
    bound = [i for i, m in enumerate(matchers or ()) if m is not None]
    if bound:  # rows bound to a grammar: each one's allowed tokens from its matcher, masked together
        rows = mask_rows(torch.stack([shaped[i] if i in shaped else logits[i].float() for i in bound]),
                         [matchers[i] for i in bound])
        top = top.index_put((torch.tensor(bound, device=top.device),), rows.argmax(-1))
        shaped.update(zip(bound, rows))
    kernel = [i for i, d in enumerate(draws or ()) if d is not None]
    drawn = [i for i, p in enumerate(params) if not p.greedy and i not in kernel]
    if drawn and BATCHED_SAMPLING:
        rows = torch.stack([shaped[i] if i in shaped else logits[i] for i in drawn])
        top = top.index_put((torch.tensor(drawn, device=top.device),),
                            draw(rows, [params[i] for i in drawn], [generators[i] for i in drawn]))
    if kernel:  # from the rows as masked above (a grammar's), else the logits
        column = lambda values: torch.tensor(values, dtype=torch.long).to(logits.device)  # noqa: E731
        rows = torch.stack([shaped[i] if i in shaped else logits[i] for i in kernel])
        picked = torch.empty(len(kernel), dtype=torch.long, device=logits.device)
        sample_rows(rows, column(range(len(kernel))), column([draws[i][0] for i in kernel]),
                    column([draws[i][1] for i in kernel]), table, picked)
        top = top.index_put((column(kernel),), picked)
    out = top.tolist()  # the one wait for the device here, greedy rows and all
    for i in drawn if not BATCHED_SAMPLING else ():  # (the per-row path: three waits a row)
        probs = sampling_probs(shaped.get(i, logits[i]), params[i])
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            continue  # degenerate distribution (non-finite logits): keep the argmax
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    lps: list[TokenLogprob | None] = [None] * len(params)
    if want:
        index = torch.tensor(want, device=logits.device)
        found = logprobs_of(logits.index_select(0, index).float(), [out[i] for i in want],
                            [params[i].logprobs for i in want])
        for i, lp in zip(want, found):
            lps[i] = lp
    return out, lps
