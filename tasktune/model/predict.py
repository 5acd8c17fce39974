"""Examples -> predictions through the shared runner.

Encoders: the task head's argmax (a label, or one tag per word). Causal LMs: either label
likelihood over the closed label set (fast, always valid) or greedy generation followed
by the task's parser (invalid outputs are kept and counted, never a crash).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tasktune.data.tokenize import encode_prompt
from tasktune.model.batches import collate_prompts
from tasktune.model.runner import Runner
from tasktune.tasks.parsers import parse_output
from tasktune.tasks.render import render
from tasktune.tasks.spec import Example, Task


@dataclass(frozen=True)
class Prediction:
    value: object  # label str, tag list, or text; None when invalid
    valid: bool
    text: str = ""  # raw generated text (causal generation)
    score: float | None = None  # probability of the predicted label, when known


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def predict_encoder(runner: Runner, task: Task, examples: list[Example], batch_size: int = 64) -> list[Prediction]:
    runner.eval()
    head = runner.heads[task.name]
    out: list[Prediction] = []
    for chunk in _chunks(examples, batch_size):
        batch = runner.collate(chunk).to(runner.device)
        hidden = runner.encode_hidden(batch)
        logits = head(hidden, batch.attention_mask)
        if head.spec.kind == "sequence":
            probs = logits.float().softmax(-1)
            conf, idx = probs.max(-1)
            out += [Prediction(head.spec.labels[i], True, score=float(c)) for i, c in zip(idx.tolist(), conf.tolist())]
            continue
        tags = logits.argmax(-1).cpu()  # [B, T]
        for row, ex in enumerate(chunk):
            words = list(ex.inputs["tokens"])
            enc = runner.tokenizer(words, is_split_into_words=True, truncation=True, max_length=runner.max_length)
            first: dict[int, int] = {}
            for pos, w in enumerate(enc.word_ids()):
                if w is not None and w not in first:
                    first[w] = pos
            pred = [head.spec.labels[int(tags[row, first[w]])] if w in first else "O" for w in range(len(words))]
            out.append(Prediction(pred, True))
    return out


@torch.no_grad()
def score_labels(runner: Runner, task: Task, examples: list[Example], batch_size: int = 64) -> list[Prediction]:
    """Pick the label whose rendered target has the highest total log-likelihood."""
    runner.eval()
    labels = list(task.labels or ())
    preds: list[Prediction] = []
    for ex in examples:
        variants = [replace(ex, target=label) for label in labels]
        totals: list[float] = []
        for chunk in _chunks(variants, batch_size):
            batch = runner.collate(chunk).to(runner.device)
            with runner._routing(batch.adapter_ids):
                logits = runner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logp = F.log_softmax(logits[:, :-1].float(), -1)
            gold = batch.labels[:, 1:]
            mask = gold != -100
            picked = logp.gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            totals += picked.sum(1).tolist()
        scores = torch.tensor(totals)
        probs = scores.softmax(0)
        best = int(scores.argmax())
        preds.append(Prediction(labels[best], True, score=float(probs[best])))
    return preds


@torch.no_grad()
def generate(
    runner: Runner, task: Task, examples: list[Example], *, max_new_tokens: int = 64, batch_size: int = 16
) -> list[Prediction]:
    """Greedy generation with each row routed to its task's adapter, then the parser."""
    runner.eval()
    tok = runner.tokenizer
    out: list[Prediction] = []
    adapter = runner.adapter_index.get(task.name, -1)
    for chunk in _chunks(examples, batch_size):
        prompts = []
        for ex in chunk:
            prompts.append(encode_prompt(tok, render(task, ex, runner.seed).prompt))
        input_ids, mask = collate_prompts(tok, prompts)
        ids = torch.full((len(chunk),), adapter, dtype=torch.long, device=runner.device)
        with runner._routing(ids):
            gen = runner.model.generate(
                input_ids=input_ids.to(runner.device), attention_mask=mask.to(runner.device),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                eos_token_id=tok.eos_token_id,
            )
        for row, ex in enumerate(chunk):
            text = tok.decode(gen[row, input_ids.shape[1]:], skip_special_tokens=True).strip()
            parsed = parse_output(task, text, ex)
            out.append(Prediction(parsed.value if parsed.valid else None, parsed.valid, text=text))
    return out


def predict(runner: Runner, task: Task, examples: list[Example], *, mode: str = "auto") -> list[Prediction]:
    """mode: auto (encoder heads; label likelihood for closed label sets; else generation),
    "likelihood" or "generate"."""
    if runner.family == "encoder":
        return predict_encoder(runner, task, examples)
    closed = task.kind in ("classification", "yesno") and task.labels
    if mode == "likelihood" or (mode == "auto" and closed):
        return score_labels(runner, task, examples)
    return generate(runner, task, examples)
