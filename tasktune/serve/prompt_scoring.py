"""A prompt's own log-probabilities (vLLM's prompt_logprobs, OpenAI's echo with logprobs):
a prefill that keeps every position's output, as lm-evaluation-harness's log-likelihoods
need."""

from __future__ import annotations

from dataclasses import replace

import torch

from tasktune.serve.branch_scoring import SCORING_ROWS
from tasktune.serve.decoder import Decoder
from tasktune.serve.forward_batch import make_batch
from tasktune.serve.kv_cache import KVCache
from tasktune.serve.prefill_graphs import PrefillStep
from tasktune.serve.sampling import TokenLogprob, logprob_table


@torch.no_grad()
def score_prompts(model: Decoder, cache: KVCache, stacks, seqs: list, device: torch.device,
                  prefill_step: PrefillStep | None = None) -> torch.Tensor:
    """Prefill `seqs` (scheduler Sequences, in their KV slots) -> each one's last logits
    [B, vocab] float32, as the other prefill paths give them, after filling the
    `prompt_logprobs` of those that ask. Through `prefill_step`'s graphs where it takes the
    prompts (on a GPU: one replay for up to 8 of them, where the eager prefill is ~40
    launches a layer), else eagerly. The LM head runs over SCORING_ROWS positions at a
    time, so a long prompt never holds all its logits at once."""
    prompts = [s.prompt_ids for s in seqs]
    if prefill_step is not None and prefill_step.takes([len(p) for p in prompts]):
        hidden = prefill_step.hidden(prompts, [s.kv_slot for s in seqs], [s.lora_id for s in seqs])
    else:
        batch = make_batch(prompts, [0] * len(seqs), [s.kv_slot for s in seqs], [s.lora_id for s in seqs], device)
        rows = model(replace(batch, last=None), cache, stacks, head=False)  # [N, hidden]
        ends = torch.tensor([len(p) for p in prompts]).cumsum(0).tolist()
        hidden = [rows[end - len(p):end] for p, end in zip(prompts, ends)]
    head = lambda r: model.lm_head(model.model.norm(r))  # noqa: E731
    for s, ids, h in zip(seqs, prompts, hidden):
        k = s.params.prompt_logprobs
        if k is not None:  # position t's logits score token t + 1
            targets = torch.tensor(ids[1:], device=h.device)
            table, ranks = [], []
            for lo in range(0, len(ids) - 1, SCORING_ROWS):
                logits = head(h[lo:min(lo + SCORING_ROWS, len(ids) - 1)]).float()
                chunk = targets[lo:lo + SCORING_ROWS]
                table += logprob_table(logits, chunk, k).tolist()
                # rank as vLLM counts it: the tokens at least as likely as this one
                ranks += (logits >= logits.gather(1, chunk.view(-1, 1))).sum(-1).tolist()
            s.prompt_logprobs = [None] + [replace(TokenLogprob.from_row(t, row, k), rank=max(r, 1))
                                          for t, row, r in zip(ids[1:], table, ranks)]
    return head(torch.stack([h[-1] for h in hidden])).float()
