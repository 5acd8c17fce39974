"""Pad-to-longest batches: the baseline packing is measured against, and encoder batches.

`pad_causal` right-pads causal examples to the longest in the batch (the usual HF
collate); it wastes (T - len) tokens per row, which `benchmarks` compare with
`packing.pack_examples`. `pad_encoder` does the same for encoder inputs, with an
attention mask that hides the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tasktune.data.tokenize import IGNORE, EncodedEncoder, EncodedExample


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 = real token
    labels: torch.Tensor | None  # [B, T], IGNORE on prompts / padding; None if no labels
    task_ids: torch.Tensor  # [B], task / adapter index per row
    position_ids: torch.Tensor | None = None  # [B, T] causal: 0..len-1 then 0 on padding

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> "PaddedBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PaddedBatch(**moved)


def pad_rows(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Ragged id lists -> [B, T] LongTensor filled with `value`; left=True pads in front
    (prompts for generation)."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def pad_causal(examples: list[EncodedExample], pad_id: int, task_ids: list[int] | None = None) -> PaddedBatch:
    """Right-padded causal batch; with `attention_mask` a HF causal LM ignores the padding."""
    lens = [len(e) for e in examples]
    position_ids = pad_rows([list(range(n)) for n in lens], 0)
    return PaddedBatch(
        input_ids=pad_rows([e.input_ids for e in examples], pad_id),
        attention_mask=pad_rows([[1] * n for n in lens], 0),
        labels=pad_rows([e.labels for e in examples], IGNORE),
        task_ids=torch.tensor(task_ids if task_ids is not None else [0] * len(examples), dtype=torch.long),
        position_ids=position_ids,
    )


def pad_encoder(encodings: list[EncodedEncoder], pad_id: int, task_ids: list[int] | None = None) -> PaddedBatch:
    """Right-padded encoder batch; `labels` only when every row has token labels."""
    has_labels = all(e.labels is not None for e in encodings)
    return PaddedBatch(
        input_ids=pad_rows([e.input_ids for e in encodings], pad_id),
        attention_mask=pad_rows([e.attention_mask for e in encodings], 0),
        labels=pad_rows([e.labels for e in encodings], IGNORE) if has_labels else None,
        task_ids=torch.tensor(task_ids if task_ids is not None else [0] * len(encodings), dtype=torch.long),
    )
