"""Small per-task heads for encoder backbones (the embedded MiniLM-L6).

An encoder cannot write text, so each task gets a linear head over the (adapted) encoder:
sequence classification over the mean-pooled tokens (MiniLM was trained with mean
pooling), token tagging over each word's first sub-token. Heads are saved beside the
PEFT adapter as `heads/<task>.safetensors` + `heads/<task>.json` (labels, kind).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class HeadSpec:
    task: str
    kind: str  # "sequence" | "token"
    labels: tuple[str, ...]


class TaskHead(nn.Module):
    """dropout + linear; `kind` decides whether it reads the pooled vector or every token.
    Training sets the dropout from `train.head_dropout` (default 0.1, as here)."""

    def __init__(self, spec: HeadSpec, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.spec = spec
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden, len(spec.labels))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # hidden: [B, T, H], attention_mask: [B, T]
        if self.spec.kind == "token":
            return self.proj(self.dropout(hidden))  # [B, T, L]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, H]
        return self.proj(self.dropout(pooled))  # [B, L]


def save_head(head: TaskHead, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, folder / f"{head.spec.task}.safetensors")
    meta = {"task": head.spec.task, "kind": head.spec.kind, "labels": list(head.spec.labels), "hidden": head.proj.in_features}
    (folder / f"{head.spec.task}.json").write_text(json.dumps(meta, indent=2))


def load_head(folder: Path, task: str) -> TaskHead:
    meta = json.loads((folder / f"{task}.json").read_text())
    head = TaskHead(HeadSpec(meta["task"], meta["kind"], tuple(meta["labels"])), meta["hidden"])
    head.load_state_dict(load_file(str(folder / f"{task}.safetensors")))
    return head
