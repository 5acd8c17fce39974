"""Decoding constrained to a closed set of answers (vLLM's `guided_choice`).

Each answer is a token sequence: the tokenizer's encoding of the answer on its own, which
is how training encodes a target (data/tokenize.py: prompt and target tokenised apart), so
a trained adapter's label is exactly one of these paths. At every step a constrained row
may take only a token that continues some answer it is still a prefix of, or an end token
once it has spelled one out whole; every other logit is set to -inf before sampling (the
log-probabilities reported stay the model's raw ones, as vLLM reports them).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch


def encode_answers(tokenizer, texts: Sequence[str], vocab_size: int) -> tuple[tuple[int, ...], ...]:
    """Answers -> their token paths, each encoded on its own as training encodes a target.
    Raises ValueError for an answer that encodes to nothing or outside the vocabulary."""
    paths = tuple(tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    if any(not c for c in paths):
        raise ValueError("an answer encodes to no tokens")
    if any(t >= vocab_size for c in paths for t in c):
        raise ValueError("an answer has tokens outside the model's vocabulary")
    return paths


def next_tokens(choices: Sequence[Sequence[int]], generated: Sequence[int], end_ids: Collection[int]) -> list[int]:
    """The tokens a row that has generated `generated` may take next: each answer's next token
    where `generated` is a proper prefix of it, the end tokens where it equals one. Never
    empty while `generated` is a prefix of some answer, which the constraint keeps true."""
    n, allowed = len(generated), set()
    prefix = tuple(generated)
    for c in choices:
        if len(c) >= n and tuple(c[:n]) == prefix:
            if len(c) > n:
                allowed.add(c[n])
            else:
                allowed.update(end_ids)
    return sorted(allowed)


def constrain_rows(logits: torch.Tensor, rows: Sequence[int], choices: Sequence[Sequence[Sequence[int]]],
                   generated: Sequence[Sequence[int]], end_ids: Collection[int]) -> torch.Tensor:
    """The rows `rows` of logits [B, V], each with every token but its next_tokens' at -inf ->
    [len(rows), V], in a few launches whatever the number of rows (one index of all rows'
    allowed tokens). A row with none (no end token known: nothing could finish its answer)
    is left as it is."""
    V = logits.shape[1]
    pairs: list[int] = []
    free: list[int] = []
    for j, (c, g) in enumerate(zip(choices, generated)):
        allowed = [t for t in next_tokens(c, g, end_ids) if t < V]
        if not allowed:
            free.append(j)
        for t in allowed:
            pairs += (j, t)
    out = logits.index_select(0, torch.tensor(list(rows), dtype=torch.long).to(logits.device))
    if len(free) == len(rows):
        return out
    index = torch.tensor(pairs, dtype=torch.long).view(-1, 2).to(logits.device, non_blocking=True)
    keep = out[index[:, 0], index[:, 1]]
    kept = out[free] if free else None
    out.fill_(float("-inf"))
    out[index[:, 0], index[:, 1]] = keep
    if free:
        out[free] = kept
    return out
