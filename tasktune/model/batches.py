"""Examples of mixed tasks -> one padded batch with a per-row adapter index.

Encoders read the raw input fields (joined by the separator token) or, for tagging, the
word list; causal LMs read the rendered instruction with loss on the target only. Each
row carries its task so that the runner can split the loss per task and route the row
to its task's adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tasktune.data.tokenize import encode_causal, encode_encoder
from tasktune.tasks.render import render
from tasktune.tasks.spec import Example, Task

IGNORE = -100


@dataclass
class Batch:
    row_tasks: list[str]
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    adapter_ids: torch.Tensor  # [B], -1 = base model only
    labels: torch.Tensor | None = None  # causal: [B, T] next-token targets (IGNORE on prompt/pad)
    seq_labels: torch.Tensor | None = None  # encoder: [B] class index, IGNORE for token-level rows
    tok_labels: torch.Tensor | None = None  # encoder: [B, T] tag index on first sub-tokens

    def to(self, device: torch.device | str) -> "Batch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)


def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row):] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
    return out


def encoder_text(task: Task, example: Example, sep: str) -> str:
    """The text an encoder reads for a sequence task: the input fields, in order."""
    return f" {sep} ".join(str(example.inputs[f]) for f in task.input_fields)


def collate_encoder(
    tokenizer, tasks: dict[str, Task], examples: list[Example], adapter_index: dict[str, int], max_length: int
) -> Batch:
    ids, masks, seq_labels, tok_labels = [], [], [], []
    sep = tokenizer.sep_token or "|"
    for ex in examples:
        task = tasks[ex.task]
        if task.kind == "tagging":
            tag_index = {t: i for i, t in enumerate(tagging_labels(task))}
            tags = [tag_index.get(t, 0) for t in ex.target] if isinstance(ex.target, list) else None
            enc = encode_encoder(tokenizer, list(ex.inputs["tokens"]), max_length, tags)
            seq_labels.append(IGNORE)
            tok_labels.append(enc.labels if enc.labels is not None else [IGNORE] * len(enc.input_ids))
        else:
            enc = encode_encoder(tokenizer, encoder_text(task, ex, sep), max_length, None)
            labels = task.labels or ()
            seq_labels.append(labels.index(ex.target) if ex.target in labels else IGNORE)
            tok_labels.append([IGNORE] * len(enc.input_ids))
        ids.append(list(enc.input_ids))
        masks.append([1] * len(enc.input_ids))
    return Batch(
        row_tasks=[ex.task for ex in examples],
        input_ids=_pad(ids, tokenizer.pad_token_id or 0),
        attention_mask=_pad(masks, 0),
        adapter_ids=torch.tensor([adapter_index.get(ex.task, -1) for ex in examples], dtype=torch.long),
        seq_labels=torch.tensor(seq_labels, dtype=torch.long),
        tok_labels=_pad(tok_labels, IGNORE),
    )


def collate_causal(
    tokenizer, tasks: dict[str, Task], examples: list[Example], adapter_index: dict[str, int], max_length: int, seed: int
) -> Batch:
    ids, labels = [], []
    for ex in examples:
        enc = encode_causal(tokenizer, render(tasks[ex.task], ex, seed), max_length)
        ids.append(list(enc.input_ids))
        labels.append(list(enc.labels))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = _pad(ids, pad)
    return Batch(
        row_tasks=[ex.task for ex in examples],
        input_ids=input_ids,
        attention_mask=_pad([[1] * len(r) for r in ids], 0),
        adapter_ids=torch.tensor([adapter_index.get(ex.task, -1) for ex in examples], dtype=torch.long),
        labels=_pad(labels, IGNORE),
    )


def collate_prompts(tokenizer, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt batch for generation: (input_ids, attention_mask)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return _pad(prompts, pad, left=True), _pad([[1] * len(p) for p in prompts], 0, left=True)


def tagging_labels(task: Task) -> tuple[str, ...]:
    from tasktune.tasks.spec import tag_label_set

    return tag_label_set(task.labels or ())


def with_target(example: Example, target: str) -> Example:
    return replace(example, target=target)
