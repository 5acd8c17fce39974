"""Pack many short causal examples into few rows, each example attending only to itself.

Dialogue-understanding examples are short (an intent label after a one-line utterance),
so padding a batch to its longest example wastes most of the compute. Packing puts
several examples side by side in one row of at most `max_tokens` tokens; a block-causal
mask keeps them independent and position ids restart at 0 for each, so every example
sees exactly what it would see alone.

How the mask reaches a Llama in transformers 5.x (read in masking_utils.py and
models/llama/modeling_llama.py of the installed version):
  * `create_causal_mask` returns any 4-D `attention_mask` as-is ("already prepared or
    custom"), so `block_causal_mask(...)` of shape [B, 1, T, T] goes straight to the
    attention function of every layer.
  * eager attention ADDS the mask to the scores (`attn_weights + attention_mask`), so it
    needs the additive float form (0 = attend, dtype-min = blocked); a boolean mask
    would be added as 0/1 and isolate nothing. sdpa accepts both forms (bool:
    True = attend). The additive form is the default here because it works for both.
  * Without a mask, transformers 5.x also detects packing from `position_ids` alone
    (`find_packed_sequence_indices`: a position that is not previous + 1 starts a new
    sequence), but only with `attention_mask=None` AND `past_key_values=None`; the
    Llama forward creates a DynamicCache when use_cache is left at its default True,
    which silently turns the detection off and lets examples attend to each other.
    The explicit 4-D mask works whatever use_cache is, so we always pass it (and
    training should still pass use_cache=False: a cache is useless there).
  * Padding tokens attend only to themselves so no softmax row is empty (an all-blocked
    row is NaN in eager with -inf, uniform with dtype-min); their labels are IGNORE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tasktune.data.tokenize import IGNORE, EncodedExample
from tasktune.errors import TasktuneError


@dataclass
class PackedBatch:
    """Rows of packed examples. T is the longest row; padding fills the rest."""

    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE on prompts, padding and each example's first token
    position_ids: torch.Tensor  # [B, T], restart at 0 for each example; 0 on padding
    segment_ids: torch.Tensor  # [B, T], which example of the row a token belongs to; -1 = padding
    token_task: torch.Tensor  # [B, T], task / adapter index per token; -1 = padding
    seq_lens: list[list[int]]  # per row: the length of each example in it, in order
    row_examples: list[list[int]]  # per row: indices (into the input list) of its examples

    def attention_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The block-causal mask for this batch: [B, 1, T, T] (see `block_causal_mask`)."""
        return block_causal_mask(self.segment_ids, dtype)

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())

    def to(self, device: torch.device | str) -> "PackedBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PackedBatch(**moved)


def plan_rows(lengths: list[int], max_tokens: int, order: str = "ffd") -> list[list[int]]:
    """Assign examples to rows of at most `max_tokens` tokens; returns example indices per row.

    "ffd" (first-fit-decreasing): longest first, each into the first row it fits;
    usually within a few % of the fewest rows. "greedy": in input order, a new row when
    the next example does not fit (keeps order, e.g. for evaluation). Both are
    deterministic: ties keep input order.
    """
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise TasktuneError(f"packing: example {i} has {n} tokens, more than max_tokens={max_tokens}")
        if n <= 0:
            raise TasktuneError(f"packing: example {i} is empty")
    rows: list[list[int]] = []
    if order == "greedy":
        used = max_tokens + 1
        for i, n in enumerate(lengths):
            if used + n > max_tokens:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += n
        return rows
    if order != "ffd":
        raise TasktuneError(f"packing: unknown order '{order}' (ffd or greedy)")
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        slot = next((r for r, space in enumerate(free) if space >= n), None)
        if slot is None:
            rows.append([])
            free.append(max_tokens)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= n
    return rows


def pack_examples(
    examples: list[EncodedExample],
    max_tokens: int,
    *,
    task_ids: list[int] | None = None,
    pad_id: int = 0,
    order: str = "ffd",
) -> PackedBatch:
    """Pack `examples` into rows (see `plan_rows`); `task_ids[i]` is example i's task or
    adapter index, copied onto each of its tokens (`token_task`) so a multi-adapter
    layer can route every token to its own adapter."""
    if not examples:
        raise TasktuneError("packing: no examples")
    if task_ids is not None and len(task_ids) != len(examples):
        raise TasktuneError(f"packing: {len(task_ids)} task ids for {len(examples)} examples")
    rows = plan_rows([len(e) for e in examples], max_tokens, order)
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    token_task = torch.full(shape, -1, dtype=torch.long)
    seq_lens = []
    for b, row in enumerate(rows):
        start = 0
        for seg, i in enumerate(row):
            ex, n = examples[i], len(examples[i])
            end = start + n
            input_ids[b, start:end] = torch.tensor(ex.input_ids)
            labels[b, start:end] = torch.tensor(ex.labels)
            # The first token of an example is never predicted: with the usual shift it
            # would be the target of the previous example's last token.
            labels[b, start] = IGNORE
            position_ids[b, start:end] = torch.arange(n)
            segment_ids[b, start:end] = seg
            token_task[b, start:end] = task_ids[i] if task_ids is not None else 0
            start = end
        seq_lens.append([len(examples[i]) for i in row])
    return PackedBatch(input_ids, labels, position_ids, segment_ids, token_task, seq_lens, rows)


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """segment_ids: [B, T] (-1 = padding) -> mask [B, 1, T, T].

    Query t may attend key s iff s <= t and both belong to the same example; a padding
    token attends only to itself. dtype=torch.bool gives True = attend (sdpa only);
    a float dtype gives the additive form, 0 or dtype-min (eager and sdpa).
    """
    T = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    pad = segment_ids < 0
    eye = torch.eye(T, dtype=torch.bool, device=segment_ids.device)
    allowed = same & causal & ~pad[:, None, :] | (pad[:, :, None] & eye)  # [B, T, T]
    allowed = allowed[:, None]  # [B, 1, T, T]
    if dtype == torch.bool:
        return allowed
    out = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)
