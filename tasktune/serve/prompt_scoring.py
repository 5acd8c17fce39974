"""A prompt's own log-probabilities (vLLM's prompt_logprobs, OpenAI's echo with logprobs):
a prefill that keeps every position's output, as lm-evaluation-harness's log-likelihoods
need."""

from __future__ import annotations

from dataclasses import replace
from itertools import accumulate

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
    time (of all the prompts together), so a long prompt never holds all its logits at once;
    the tables come back in one copy."""
    prompts = [s.prompt_ids for s in seqs]
    if prefill_step is not None and prefill_step.takes([len(p) for p in prompts]):
        hidden = prefill_step.hidden(prompts, [s.kv_slot for s in seqs], [s.lora_id for s in seqs])
    else:
        batch = make_batch(prompts, [0] * len(seqs), [s.kv_slot for s in seqs], [s.lora_id for s in seqs], device)
        rows = model(replace(batch, last=None), cache, stacks, head=False)  # [N, hidden]
        hidden = [rows[end - len(p):end] for p, end in zip(prompts, accumulate(len(p) for p in prompts))]
    head = lambda r: model.lm_head(model.model.norm(r))  # noqa: E731
    scored = [(s, ids, h) for s, ids, h in zip(seqs, prompts, hidden) if s.params.prompt_logprobs is not None]
    if scored:  # position t's logits score token t + 1; every prompt's positions together, one read back
        k = max(s.params.prompt_logprobs for s, _, _ in scored)
        scoring = torch.cat([h[:len(ids) - 1] for _, ids, h in scored])
        targets = torch.tensor([t for _, ids, _ in scored for t in ids[1:]], dtype=torch.long, device=scoring.device)
        parts = []
        for lo in range(0, len(scoring), SCORING_ROWS):
            logits = head(scoring[lo:lo + SCORING_ROWS]).float()
            chunk = targets[lo:lo + SCORING_ROWS]
            # rank as vLLM counts it: the tokens at least as likely as this one
            rank = (logits >= logits.gather(1, chunk.view(-1, 1))).sum(-1, keepdim=True).float()
            parts.append(torch.cat([logprob_table(logits, chunk, k), rank], 1))
        table = torch.cat(parts).tolist() if parts else []
        at = 0
        for s, ids, _ in scored:
            mine, at = table[at:at + len(ids) - 1], at + len(ids) - 1
            # (from_row reads the table's k from the row's length, which the rank column does not change)
            s.prompt_logprobs = [None] + [TokenLogprob.from_row(t, row, s.params.prompt_logprobs, max(int(row[-1]), 1))
                                          for t, row in zip(ids[1:], mine)]
    return head(torch.stack([h[-1] for h in hidden])).float()
