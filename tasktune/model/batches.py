"""Examples of mixed tasks -> one padded batch with a per-row adapter index.

Encoders read the raw input fields (joined by the separator token) or, for tagging, the
word list; causal LMs read the rendered instruction with loss on the target only. Each
row carries its task so that the runner can split the loss per task and route the row
to its task's adapter.

Everything the loss needs to know about a causal batch's shape (which positions are
scored, how many per task) is worked out here, on the host, from the CPU tensors
(`LossTargets`): the training step then never asks the device how many tokens it
holds, so it never waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tasktune.data.collate import pad_causal, pad_rows
from tasktune.data.packing import PackedBatch, block_causal_mask, pack_examples
from tasktune.data.tokenize import encode_causal, encode_encoder
from tasktune.tasks.render import render
from tasktune.tasks.spec import Example, Task

IGNORE = -100

# Packed rows are padded to a multiple of this many tokens, so that a run sees a few
# repeating shapes instead of a new width every step (allocator, kernels, torch.compile).
PACK_MULTIPLE = 128


@dataclass
class LossTargets:
    """The scored positions of a causal batch, grouped by task (stable within a task).

    position: [N] flat index into the batch's [B * T] hidden states: the position whose
    output predicts `labels` (the next token). counts[k]: how many belong to names[k]
    (host ints, summing to N), so the per-task split is a host-known `split`."""

    position: torch.Tensor  # [N] long
    labels: torch.Tensor  # [N] long
    names: list[str]
    counts: list[int]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "LossTargets":
        return LossTargets(
            self.position.to(device, non_blocking=non_blocking), self.labels.to(device, non_blocking=non_blocking),
            self.names, self.counts,
        )


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
    segment_ids: torch.Tensor | None = None  # [B, T] example of the row per token; -1 = padding
    token_task: torch.Tensor | None = None  # [B, T] index into task_names; -1 = padding
    task_names: list[str] | None = None
    targets: LossTargets | None = None  # causal: see `causal_targets`

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

    def attention_4d(self, dtype: torch.dtype) -> torch.Tensor:
        """Packed batches: the block-causal additive mask [B, 1, T, T] in `dtype`, built
        where the batch lives (on the device it is a few kernels; on the host it would be
        B*T*T*4 bytes to copy over every step)."""
        # built in fp32 and cast, as the mask always was: fp32's min rounds to -inf in bf16
        return block_causal_mask(self.segment_ids, torch.float32).to(dtype)

    def to(self, device: torch.device | str) -> "Batch":
        """Copies to `device` without waiting for it: a blocking host-to-device copy would
        first wait for every kernel already queued (the previous step's backward)."""
        device = torch.device(device)
        non_blocking = device.type == "cuda"
        moved = {
            k: (v.to(device, non_blocking=non_blocking) if isinstance(v, (torch.Tensor, LossTargets)) else v)
            for k, v in self.__dict__.items()
        }
        return Batch(**moved)


def causal_targets(batch: Batch) -> LossTargets:
    """The scored positions of a causal batch (labels[:, t + 1] != IGNORE, predicted from
    position t), ordered by task, then row-major. Runs where the batch lives: on the host
    (where collate builds it) it costs the device nothing."""
    B, T = batch.labels.shape
    nxt = batch.labels[:, 1:]  # [B, T-1]
    keep = nxt != IGNORE
    rows, cols = keep.nonzero(as_tuple=True)  # row-major, as boolean indexing orders them
    position = rows * T + cols
    labels = nxt[keep]
    if batch.token_task is not None:
        names = list(batch.task_names)
        task = batch.token_task[:, 1:][keep]  # [N]
    else:
        names = list(dict.fromkeys(batch.row_tasks))
        row_task = torch.tensor([names.index(t) for t in batch.row_tasks], dtype=torch.long, device=rows.device)
        task = row_task[rows]
    order = torch.sort(task, stable=True).indices
    counts = torch.bincount(task, minlength=len(names)).tolist()
    return LossTargets(position[order], labels[order], names, counts)


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
    batch = Batch(
        row_tasks=[ex.task for ex in examples],
        input_ids=padded.input_ids,
        attention_mask=padded.attention_mask,
        adapter_ids=torch.tensor([adapter_index.get(ex.task, -1) for ex in examples], dtype=torch.long),
        labels=padded.labels,
    )
    return replace(batch, targets=causal_targets(batch))


def collate_causal_packed(
    tokenizer, tasks: dict[str, Task], examples: list[Example], adapter_index: dict[str, int], max_length: int,
    seed: int, max_tokens: int, multiple: int = PACK_MULTIPLE,
) -> Batch:
    """Pack the batch's examples into rows of at most max_tokens; every token carries its
    task (for the per-task loss) and its adapter (for routing). The rows are padded to a
    multiple of `multiple` tokens (1: to the longest row): padding attends only to itself
    and is never scored, so the losses do not change."""
    names = list(dict.fromkeys(ex.task for ex in examples))
    encoded = [encode_causal(tokenizer, render(tasks[ex.task], ex, seed), max_length) for ex in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    packed = pack_examples(encoded, max(max_tokens, max(len(e) for e in encoded)), task_ids=[names.index(ex.task) for ex in examples], pad_id=pad)
    packed = pad_width(packed, -(-packed.input_ids.shape[1] // multiple) * multiple, pad)
    adapters = torch.tensor([adapter_index.get(n, -1) for n in names] + [-1], dtype=torch.long)
    token_adapter = adapters[packed.token_task]  # -1 (padding) indexes the trailing -1
    batch = Batch(
        row_tasks=[ex.task for ex in examples],
        input_ids=packed.input_ids,
        attention_mask=(packed.segment_ids >= 0).long(),
        adapter_ids=token_adapter,
        labels=packed.labels,
        position_ids=packed.position_ids,
        segment_ids=packed.segment_ids,
        token_task=packed.token_task,
        task_names=names,
    )
    return replace(batch, targets=causal_targets(batch))


def pad_width(packed: PackedBatch, width: int, pad_id: int) -> PackedBatch:
    """Right-pad every row of `packed` to `width` tokens with padding (pad_id, IGNORE,
    position 0, segment and task -1), as pack_examples pads its shorter rows."""
    extra = width - packed.input_ids.shape[1]
    if extra <= 0:
        return packed
    fill = {"input_ids": pad_id, "labels": IGNORE, "position_ids": 0, "segment_ids": -1, "token_task": -1}
    grown = {k: F.pad(getattr(packed, k), (0, extra), value=v) for k, v in fill.items()}
    return replace(packed, **grown)


def collate_prompts(tokenizer, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt batch for generation: (input_ids, attention_mask)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return pad_rows(prompts, pad, left=True), pad_rows([[1] * len(p) for p in prompts], 0, left=True)


def tagging_labels(task: Task) -> tuple[str, ...]:
    from tasktune.tasks.spec import tag_label_set

    return tag_label_set(task.labels or ())


def with_target(example: Example, target: str) -> Example:
    return replace(example, target=target)
