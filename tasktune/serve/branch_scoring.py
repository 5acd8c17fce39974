"""Scoring continuations of one prompt (a closed-set task's labels) in one prefill.

`tasktune eval` picks a closed-set task's label by each label's whole target
log-likelihood after the prompt (model/predict.py, score_labels). Served as one
prompt-only request per label, that costs a prefill of the prompt per label: 150 for
CLINC150's intents. Here the labels are branches of one prompt (forward_batch.tree_batch):
the prompt is prefilled once and every branch token attends to it and to its own branch,
so each branch's log-probabilities are those of prompt + branch alone.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tasktune.errors import TasktuneError
from tasktune.serve.forward_batch import tree_batch

# The LM head runs over this many positions at a time, so a long prompt (or many branches)
# never holds all its logits at once
SCORING_ROWS = 512


class InvalidBranches(TasktuneError):
    """Continuations that cannot be scored: empty, outside the vocabulary, too long (HTTP 400)."""


def check_branches(branches: list[list[int]], vocab_size: int) -> list[list[int]]:
    """The branches as lists of ints; raises InvalidBranches naming the first unusable one."""
    if not branches:
        raise InvalidBranches("branches: give at least one continuation to score")
    out = []
    for i, b in enumerate(branches):
        b = [int(t) for t in b]
        if not b:
            raise InvalidBranches(f"branches[{i}] is empty")
        if any(not 0 <= t < vocab_size for t in b):
            raise InvalidBranches(f"branches[{i}] has token ids outside the vocabulary (size {vocab_size})")
        out.append(b)
    return out


def pack_branches(prompt_len: int, lengths: list[int], max_len: int) -> list[list[int]]:
    """Branch indices in groups, in order, each fitting one slot with its prompt (prompt_len
    + the group's tokens <= max_len). Raises InvalidBranches if one branch alone does not fit."""
    packs: list[list[int]] = []
    used = max_len
    for i, n in enumerate(lengths):
        if prompt_len + n > max_len:
            raise InvalidBranches(f"the prompt ({prompt_len} tokens) and continuation {i} ({n} tokens) exceed "
                                  f"this server's limit of {max_len} tokens")
        if used + n > max_len:
            packs.append([])
            used = prompt_len
        packs[-1].append(i)
        used += n
    return packs


def reads_and_targets(prompt_len: int, branches: list[list[int]]) -> tuple[list[int], list[int]]:
    """Which output row scores each branch token (the row before it: the prompt's last for
    a branch's first token, then the branch's own), and the tokens, branch after branch."""
    reads, start = [], prompt_len
    for b in branches:
        reads += [prompt_len - 1] + list(range(start, start + len(b) - 1))
        start += len(b)
    return reads, [t for b in branches for t in b]


def score_rows(model, hidden: torch.Tensor, reads: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax of the LM head at rows `reads` of the last layer's output, taken
    at `targets` -> [len(reads)], as eval takes them; SCORING_ROWS rows at a time."""
    picked = []
    for lo in range(0, reads.shape[0], SCORING_ROWS):
        h = model.model.norm(hidden.index_select(0, reads[lo:lo + SCORING_ROWS]))
        logp = model.lm_head(h).float().log_softmax(-1)
        picked.append(logp.gather(-1, targets[lo:lo + SCORING_ROWS, None]).squeeze(-1))
    return torch.cat(picked) if len(picked) > 1 else picked[0]


def split(flat: list[float], branches: list[list[int]]) -> list[list[float]]:
    """flat per-token values back into one list per branch."""
    out, at = [], 0
    for b in branches:
        out.append(flat[at:at + len(b)])
        at += len(b)
    return out


@torch.no_grad()
def branch_logprobs(model, cache, stacks, prompt: list[int], branches: list[list[int]], slot: int,
                    lora_id: int) -> list[list[float]]:
    """Each branch token's log-probability after the prompt and the branch's earlier tokens,
    from one eager prefill of `prompt` and all branches into KV slot `slot` (which the
    caller frees afterwards). branch_graphs.BranchStep runs the same padded, from a graph."""
    batch = tree_batch(prompt, branches, slot, lora_id, cache.k.device)
    hidden = model(replace(batch, last=None), cache, stacks, head=False)  # [T, hidden]
    reads, targets = reads_and_targets(len(prompt), branches)
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=hidden.device)  # noqa: E731
    return split(score_rows(model, hidden, as_long(reads), as_long(targets)).tolist(), branches)
