"""The one model runner that training, evaluation and export share.

A `Runner` is a loaded base model, the LoRA adapters of an `AdapterPlan` injected into
it (all adapters live in the same layers; each row is routed to its task's adapter), and,
for encoders, one head per task. It turns a `Batch` into per-task losses, and examples
into predictions. What is evaluated is therefore exactly what is trained and exported.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tasktune.config import LoRASettings
from tasktune.lora.cgc import inject_cgc
from tasktune.lora.inject import inject_lora, use_adapters
from tasktune.model.batches import IGNORE, Batch, collate_causal, collate_causal_packed, collate_encoder, tagging_labels
from tasktune.model.heads import HeadSpec, TaskHead, save_head
from tasktune.model.load import LoadedModel
from tasktune.model.plan import AdapterPlan
from tasktune.tasks.spec import Example, Task


def chunked_lm_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per-token cross-entropy without materialising [N, vocab] fp32 logits at once.
    hidden: [N, H], labels: [N] -> [N]"""
    losses = []
    for i in range(0, hidden.shape[0], chunk):
        logits = head(hidden[i : i + chunk]).float()
        losses.append(F.cross_entropy(logits, labels[i : i + chunk], reduction="none"))
    return torch.cat(losses) if losses else hidden.new_zeros(0)


class Runner(nn.Module):
    def __init__(
        self, loaded: LoadedModel, tasks: list[Task], plan: AdapterPlan, lora: LoRASettings, *, max_length: int, seed: int = 0,
        pack_tokens: int = 2048,
    ):
        super().__init__()
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.family = loaded.family
        self.tasks = {t.name: t for t in tasks}
        self.plan = plan
        self.max_length = max_length
        self.seed = seed
        self.lora_settings = lora
        self.pack_tokens = max(max_length, pack_tokens)
        self.handle = None
        if plan.uses_lora:
            for p in self.model.parameters():
                p.requires_grad_(False)
            if plan.strategy == "cgc":
                self.handle = inject_cgc(
                    self.model, list(plan.adapters), r=lora.r, alpha=lora.alpha, k_common=lora.k_common,
                    k_specific=lora.k_specific, target_modules=lora.target_modules, dropout=lora.dropout,
                    input_gate=lora.input_gate,
                )
            else:
                self.handle = inject_lora(
                    self.model, list(plan.adapters), r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                    target_modules=lora.target_modules,
                )
        self.last_shares: dict[str, float] = {}  # each task's share of the last batch's rows/tokens
        self.heads = nn.ModuleDict()
        if self.family == "encoder":
            hidden = self.model.config.hidden_size
            for task in tasks:
                if task.kind == "generation":
                    continue  # filtered out earlier with a clear message; keep the runner total
                kind = "token" if task.kind == "tagging" else "sequence"
                labels = tagging_labels(task) if task.kind == "tagging" else tuple(task.labels or ())
                self.heads[task.name] = TaskHead(HeadSpec(task.name, kind, labels), hidden)

    # --- routing ---------------------------------------------------------------------
    @property
    def adapter_index(self) -> dict[str, int]:
        if self.handle is None:
            return {}
        return {t: self.handle.index(a) for t, a in self.plan.task_adapter.items()}

    def _routing(self, ids: torch.Tensor):
        return use_adapters(self.handle, ids) if self.handle is not None else nullcontext()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- batches and losses ------------------------------------------------------------
    def collate(self, examples: list[Example], *, pack: bool = False) -> Batch:
        """pack=True (causal training): examples packed into rows of `pack_tokens`."""
        if self.family == "encoder":
            return collate_encoder(self.tokenizer, self.tasks, examples, self.adapter_index, self.max_length)
        if pack:
            return collate_causal_packed(
                self.tokenizer, self.tasks, examples, self.adapter_index, self.max_length, self.seed, self.pack_tokens
            )
        return collate_causal(self.tokenizer, self.tasks, examples, self.adapter_index, self.max_length, self.seed)

    def encode_hidden(self, batch: Batch) -> torch.Tensor:
        with self._routing(batch.adapter_ids):
            return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """So that DDP (through accelerate) sees the loss computation as the forward."""
        return self.task_losses(batch)

    def task_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Each task's contribution to the batch-mean loss: sum of its rows' (tokens')
        losses over the batch's rows (tokens). Their sum is the plain mixture loss; loss
        weighting rescales them per task. A task's own mean loss is its contribution
        divided by `self.last_shares[task]`."""
        batch = batch.to(self.device)
        if self.family == "encoder":
            return self._encoder_losses(batch)
        return self._causal_losses(batch)

    def _encoder_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        hidden = self.encode_hidden(batch)  # [B, T, H]
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for name in dict.fromkeys(batch.row_tasks):
            rows = torch.tensor([i for i, t in enumerate(batch.row_tasks) if t == name], device=hidden.device)
            head = self.heads[name]
            logits = head(hidden[rows], batch.attention_mask[rows])
            if head.spec.kind == "token":
                gold = batch.tok_labels[rows]
                loss = F.cross_entropy(logits.flatten(0, 1), gold.flatten(), ignore_index=IGNORE, reduction="sum")
                counts[name] = int((gold != IGNORE).sum())
            else:
                gold = batch.seq_labels[rows]
                loss = F.cross_entropy(logits, gold, ignore_index=IGNORE, reduction="sum")
                counts[name] = int((gold != IGNORE).sum())
            sums[name] = loss
        # Token tasks count tokens, sequence tasks count rows: normalise each by its own
        # unit, then weight by its share of the batch's rows so the sum is a batch mean.
        n_rows = len(batch.row_tasks)
        self.last_shares = {t: batch.row_tasks.count(t) / n_rows for t in sums}
        return {t: sums[t] / max(counts[t], 1) * self.last_shares[t] for t in sums}

    def _causal_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        packed = batch.attention_4d is not None
        with self._routing(batch.adapter_ids):
            hidden = self.model.base_model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_4d.to(self.model.dtype) if packed else batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).last_hidden_state
        # predict token t+1 from position t; only target positions reach the LM head
        labels = batch.labels[:, 1:]  # [B, T-1]
        keep = labels != IGNORE
        tok_loss = chunked_lm_loss(self.model.get_output_embeddings(), hidden[:, :-1][keep], labels[keep])  # [N]
        if packed:
            owner = batch.token_task[:, 1:][keep]  # [N] index into task_names
            names = batch.task_names
        else:
            names = list(dict.fromkeys(batch.row_tasks))
            owner = torch.tensor([names.index(t) for t in batch.row_tasks], device=hidden.device)
            owner = owner.unsqueeze(1).expand_as(labels)[keep]
        total = max(int(keep.sum()), 1)
        out: dict[str, torch.Tensor] = {}
        self.last_shares = {}
        for k in sorted(set(owner.tolist())):
            mine = owner == k
            out[names[k]] = tok_loss[mine].sum() / total
            self.last_shares[names[k]] = int(mine.sum()) / total
        return out

    # --- parameters and saving ---------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return params + list(self.heads.parameters())

    def trainable_count(self, task: str | None = None) -> int:
        """Trainable parameters in all, or those a task's predictions depend on."""
        if task is None:
            return sum(p.numel() for p in self.trainable_parameters())
        n = sum(p.numel() for p in self.heads[task].parameters()) if task in self.heads else 0
        if self.handle is not None:
            n += self.handle.trainable_parameter_count(self.plan.task_adapter[task])
        else:
            n += sum(p.numel() for p in self.model.parameters())
        return n

    def save(self, out_dir: Path) -> dict[str, Path]:
        """Adapters in PEFT format under adapters/<name>/, heads under heads/, or for
        `full` the whole model as a Hugging Face folder under model/."""
        from tasktune.lora.peft_io import save_adapter

        out_dir = Path(out_dir)
        written: dict[str, Path] = {}
        task_type = "CAUSAL_LM" if self.family == "causal" else "FEATURE_EXTRACTION"
        if self.plan.strategy == "cgc":
            # With a task-id gate each task's mixture is exactly one LoRA: serve it as one.
            from tasktune.lora.fold import save_folded_adapter

            if self.handle.spec.input_gate:  # the ablation cannot be folded; keep its raw weights
                from safetensors.torch import save_file

                out_dir.mkdir(parents=True, exist_ok=True)
                state = {n: p.detach().contiguous().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
                save_file(state, str(out_dir / "cgc_state.safetensors"))
            else:
                for name in self.plan.adapters:
                    written[name] = save_folded_adapter(self.handle, name, out_dir / "adapters" / name, self.loaded.path, task_type)
            gates = {"experts": self.handle.expert_labels(), "gates": self.handle.gate_weights()}
            (out_dir / "cgc_gates.json").write_text(json.dumps(gates, indent=1))
        elif self.handle is not None:
            for name in self.plan.adapters:
                folder = out_dir / "adapters" / name
                save_adapter(self.handle, name, folder, self.loaded.path, task_type=task_type)
                written[name] = folder
        else:
            self.model.save_pretrained(out_dir / "model", safe_serialization=True)
            self.tokenizer.save_pretrained(out_dir / "model")
            written["model"] = out_dir / "model"
        for head in self.heads.values():
            save_head(head, out_dir / "heads")
        return written
