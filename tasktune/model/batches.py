"""Examples of mixed tasks -> one padded batch with a per-row adapter index.

Encoders read the raw input fields (joined by the separator token) or, for tagging, the
word list; causal LMs read the rendered instruction with loss on the target only. Each
row carries its task so that the runner can split the loss per task and route the row
to its task's adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tasktune.data.collate import pad_causal, pad_rows
from tasktune.data.packing import pack_examples
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
    # Packed causal batches: several examples per row, each attending only to itself.
    position_ids: torch.Tensor | None = None  # [B, T], restarting per example
    attention_4d: torch.Tensor | None = None  # [B, 1, T, T] additive block-causal mask
    token_task: torch.Tensor | None = None  # [B, T] index into task_names; -1 = padding
    task_names: list[str] | None = None

    def to(self, device: torch.device | str) -> "Batch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)


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
        input_ids=pad_rows(ids, tokenizer.pad_token_id or 0),
        attention_mask=pad_rows(masks, 0),
        adapter_ids=torch.tensor([adapter_index.get(ex.task, -1) for ex in examples], dtype=torch.long),
        seq_labels=torch.tensor(seq_labels, dtype=torch.long),
        tok_labels=pad_rows(tok_labels, IGNORE),
    )


def collate_causal(
    tokenizer, tasks: dict[str, Task], examples: list[Example], adapter_index: dict[str, int], max_length: int, seed: int
) -> Batch:
    encoded = [encode_causal(tokenizer, render(tasks[ex.task], ex, seed), max_length) for ex in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    padded = pad_causal(encoded, pad)
    return Batch(
        row_tasks=[ex.task for ex in examples],
        input_ids=padded.input_ids,
        attention_mask=padded.attention_mask,
        adapter_ids=torch.tensor([adapter_index.get(ex.task, -1) for ex in examples], dtype=torch.long),
        labels=padded.labels,
    )


def collate_causal_packed(
    tokenizer, tasks: dict[str, Task], examples: list[Example], adapter_index: dict[str, int], max_length: int,
    seed: int, max_tokens: int,
) -> Batch:
    """Pack the batch's examples into rows of at most max_tokens; every token carries its
    task (for the per-task loss) and its adapter (for routing)."""
    names = list(dict.fromkeys(ex.task for ex in examples))
    encoded = [encode_causal(tokenizer, render(tasks[ex.task], ex, seed), max_length) for ex in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    packed = pack_examples(encoded, max(max_tokens, max(len(e) for e in encoded)), task_ids=[names.index(ex.task) for ex in examples], pad_id=pad)
    adapters = torch.tensor([adapter_index.get(n, -1) for n in names] + [-1], dtype=torch.long)
    token_adapter = adapters[packed.token_task]  # -1 (padding) indexes the trailing -1
    return Batch(
        row_tasks=[ex.task for ex in examples],
        input_ids=packed.input_ids,
        attention_mask=(packed.segment_ids >= 0).long(),
        adapter_ids=token_adapter,
        labels=packed.labels,
        position_ids=packed.position_ids,
        attention_4d=packed.attention_mask(torch.float32),
        token_task=packed.token_task,
        task_names=names,
    )


def collate_prompts(tokenizer, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt batch for generation: (input_ids, attention_mask)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return pad_rows(prompts, pad, left=True), pad_rows([[1] * len(p) for p in prompts], 0, left=True)


def tagging_labels(task: Task) -> tuple[str, ...]:
    from tasktune.tasks.spec import tag_label_set

    return tag_label_set(task.labels or ())


def with_target(example: Example, target: str) -> Example:
    return replace(example, target=target)
