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
from tasktune.data.packing import block_causal_mask
from tasktune.errors import TasktuneError
from tasktune.lora.cgc import inject_cgc
from tasktune.lora.inject import inject_lora, use_adapters
from tasktune.model.batches import (
    IGNORE, PACK_MULTIPLE, Batch, causal_targets, collate_causal, collate_causal_packed, collate_encoder, tagging_labels,
)
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


# The name under which sharded training (train/sharded.py) registers scored_token_losses on
# the model as an FSDP forward method.
SHARDED_FORWARD = "tasktune_token_losses"


def scored_token_losses(
    model: nn.Module, input_ids: torch.Tensor, attention_mask, position_ids, position: torch.Tensor, labels: torch.Tensor,
) -> torch.Tensor:
    """A causal LM's per-token losses [N] at the scored positions only (flat indices into
    its [B * T] hidden states): the LM head never sees the prompt or padding positions."""
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
    ).last_hidden_state  # [B, T, H]
    scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, position)  # [N, H]
    return chunked_lm_loss(model.get_output_embeddings(), scored, labels)


class Runner(nn.Module):
    def __init__(
        self, loaded: LoadedModel, tasks: list[Task], plan: AdapterPlan, lora: LoRASettings, *, max_length: int, seed: int = 0,
        pack_tokens: int = 2048, pack_multiple: int = PACK_MULTIPLE, head_dropout: float = 0.1,
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
        self.pack_multiple = pack_multiple  # packed rows are padded to a multiple of this (few shapes)
        self.handle = None
        self.gathered_weights: dict[str, torch.Tensor] | None = None  # strategy `full` after sharded training
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
                self.heads[task.name] = TaskHead(HeadSpec(task.name, kind, labels), hidden, dropout=head_dropout)

    # --- routing ---------------------------------------------------------------------
    @property
    def adapter_index(self) -> dict[str, int]:
        if self.handle is None:
            return {}
        return {t: self.handle.index(a) for t, a in self.plan.task_adapter.items()}

    def _routing(self, ids: torch.Tensor):
        """Route the forwards inside the block. ids may be the host copy: the adapters get
        it copied without a wait, and the layers plan on the host copy (no device sync)."""
        return use_adapters(self.handle, ids) if self.handle is not None else nullcontext()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- batches and losses ------------------------------------------------------------
    def collate(self, examples: list[Example], *, pack: bool = False) -> Batch:
        """pack=True (causal training): examples packed into rows of `pack_tokens`, padded
        to a multiple of `pack_multiple`."""
        if self.family == "encoder":
            return collate_encoder(self.tokenizer, self.tasks, examples, self.adapter_index, self.max_length)
        if pack:
            return collate_causal_packed(
                self.tokenizer, self.tasks, examples, self.adapter_index, self.max_length, self.seed, self.pack_tokens,
                self.pack_multiple,
            )
        return collate_causal(self.tokenizer, self.tasks, examples, self.adapter_index, self.max_length, self.seed)

    def encode_hidden(self, batch: Batch) -> torch.Tensor:
        dev = batch.to(self.device)
        with self._routing(batch.adapter_ids):
            return self.model(input_ids=dev.input_ids, attention_mask=dev.attention_mask).last_hidden_state

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """So that DDP (through accelerate) sees the loss computation as the forward."""
        return self.task_losses(batch)

    def task_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Each task's contribution to the batch-mean loss: sum of its rows' (tokens')
        losses over the batch's rows (tokens). Their sum is the plain mixture loss; loss
        weighting rescales them per task. A task's own mean loss is its contribution
        divided by `self.last_shares[task]` (host floats, known without asking the device).

        Pass the batch as collated, on the host: what the loss needs to know about its
        shape is read there, so a training step never waits for the device (no `.item()`,
        no `.tolist()`, no boolean indexing, no blocking copy)."""
        if self.family == "encoder":
            return self._encoder_losses(batch)
        return self._causal_losses(batch)

    def _encoder_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        # Rows and labelled units of each task, counted on the host before the batch moves.
        names = list(dict.fromkeys(batch.row_tasks))
        rows = {n: [i for i, t in enumerate(batch.row_tasks) if t == n] for n in names}
        gold_host = {
            n: (batch.tok_labels if self.heads[n].spec.kind == "token" else batch.seq_labels)[torch.tensor(rows[n])]
            for n in names
        }
        counts = {n: int((g != IGNORE).sum()) for n, g in gold_host.items()}
        device = self.device
        dev = batch.to(device)
        with self._routing(batch.adapter_ids):
            out = self.model(input_ids=dev.input_ids, attention_mask=dev.attention_mask)
        hidden = out.last_hidden_state  # [B, T, H]
        sums: dict[str, torch.Tensor] = {}
        for name in names:
            idx = torch.tensor(rows[name]).to(device, non_blocking=True)
            head = self.heads[name]
            logits = head(hidden.index_select(0, idx), dev.attention_mask.index_select(0, idx))
            gold = gold_host[name].to(device, non_blocking=True)
            if head.spec.kind == "token":
                logits, gold = logits.flatten(0, 1), gold.flatten()
            sums[name] = F.cross_entropy(logits, gold, ignore_index=IGNORE, reduction="sum")
        # Token tasks count tokens, sequence tasks count rows: normalise each by its own
        # unit, then weight by its share of the batch's rows so the sum is a batch mean.
        n_rows = len(batch.row_tasks)
        self.last_shares = {t: len(rows[t]) / n_rows for t in names}
        return {t: sums[t] / max(counts[t], 1) * self.last_shares[t] for t in names}

    def _causal_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        targets = batch.targets if batch.targets is not None else causal_targets(batch)  # host work on a host batch
        dev = batch.to(self.device)
        t = targets.to(self.device, non_blocking=True)
        # Unpacked batches: HF reads the device once per forward to simplify the mask
        # (an all-ones check); packed ones (training) come with the mask built here.
        mask = dev.attention_4d(self.model.dtype) if dev.packed else dev.attention_mask
        with self._routing(batch.adapter_ids):  # predict token t+1 from position t
            tok_loss = self._token_losses(dev.input_ids, mask, dev.position_ids, t.position, t.labels)  # [N], by task
        total = max(sum(targets.counts), 1)
        out: dict[str, torch.Tensor] = {}
        self.last_shares = {}
        for name, count, part in zip(targets.names, targets.counts, tok_loss.split(targets.counts)):
            if count:
                out[name] = part.sum() / total
                self.last_shares[name] = count / total
        return out

    def static_losses(self, s: dict[str, torch.Tensor], static) -> torch.Tensor:
        """Per-task loss contributions [n_tasks] (order: `static.names`) of a causal batch
        given as device tensors (train/graphed_step.py's StaticBatch): no host reads and no
        host-dependent shapes, so a CUDA graph can capture it. Equals `task_losses` up to
        summation order; absent tasks get exactly 0."""
        mask = None
        if "segment_ids" in s:  # packed rows or padding: the additive block-causal mask
            mask = block_causal_mask(s["segment_ids"], torch.float32).to(self.model.dtype)
        with use_adapters(self.handle, s["adapter_ids"]) if self.handle is not None else nullcontext():
            tok_loss = self._token_losses(s["input_ids"], mask, s.get("position_ids"), s["position"], s["labels"])  # 0: IGNORE
        sums = torch.zeros(len(static.names), dtype=tok_loss.dtype, device=tok_loss.device)
        return sums.index_add(0, s["task"], tok_loss) * s["inv_total"]

    def _token_losses(self, *args) -> torch.Tensor:
        """scored_token_losses on this model; sharded (train/sharded.py), through the method
        registered as an FSDP forward so that the root's weights are gathered for it."""
        method = getattr(self.model, SHARDED_FORWARD, None)
        return method(*args) if method is not None else scored_token_losses(self.model, *args)

    def repeated_blocks(self) -> nn.ModuleList:
        """The model's list of repeated blocks (decoder or encoder layers): the largest
        ModuleList whose members share one type."""
        lists = [
            m for m in self.model.modules() if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1
        ]
        if not lists:
            raise TasktuneError("the model has no list of repeated blocks")
        return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))

    def compile_blocks(self, **options) -> int:
        """Opt-in speed: torch.compile each repeated block of the model (the decoder or
        encoder layers, LoRA layers inside) in place, so a block runs as a few fused
        kernels instead of hundreds of eager ops. Parameter names, saved adapters and the
        eager glue between blocks (embeddings, mask, LM head, loss) are unchanged.
        `options` go to torch.compile (e.g. backend="aot_eager" on a machine without a
        compiler). Returns the number of blocks compiled."""
        blocks = self.repeated_blocks()
        # Every block shares one compiled code object, and training feeds it several
        # variants: the first block's input needs no grad, the others' do; packed batches
        # change rows and length every step (and a size of 1 is always specialised). Start
        # dynamic, and leave room for those variants: past the recompile limit (8) Dynamo
        # silently runs the remaining shapes eagerly.
        options.setdefault("dynamic", True)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in blocks:
            block.compile(**options)
        return len(blocks)

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
        else:  # sharded training leaves the whole weights gathered on rank 0 (train/sharded.py)
            self.model.save_pretrained(out_dir / "model", safe_serialization=True, state_dict=self.gathered_weights)
            self.tokenizer.save_pretrained(out_dir / "model")
            written["model"] = out_dir / "model"
        for head in self.heads.values():
            save_head(head, out_dir / "heads")
        return written
