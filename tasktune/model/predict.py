"""Examples -> predictions through the shared runner.

Encoders: the task head's argmax (a label, or one tag per word), from one forward over a
batch that may mix tasks (the server's batches do; evaluation's hold one task). Causal
LMs: either label likelihood over the closed label set (fast, always valid) or greedy
generation followed by the task's parser (invalid outputs are kept and counted, never a
crash).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tasktune.data.tokenize import encode_prompt
from tasktune.model.batches import collate_prompts
from tasktune.model.heads import HeadSpec
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
def encoder_logits(runner: Runner, examples: list[Example]) -> list[torch.Tensor]:
    """One forward over examples of any mix of tasks: each row goes through its task's
    adapter (the batch's per-row adapter ids), then through its own task's head.
    Per row: a sequence task's label logits [L], a tagging task's tag logits [T, L]."""
    batch = runner.collate(examples).to(runner.device)
    hidden = runner.encode_hidden(batch)  # [B, T, H]
    out: list[torch.Tensor | None] = [None] * len(examples)
    for name in dict.fromkeys(batch.row_tasks):
        rows = [i for i, t in enumerate(batch.row_tasks) if t == name]
        logits = runner.heads[name](hidden[rows], batch.attention_mask[rows])  # [b, L] or [b, T, L]
        for j, i in enumerate(rows):
            out[i] = logits[j]
    return out


def first_subtokens(tokenizer, words: list[str], max_length: int) -> list[int | None]:
    """Each word's first sub-token position as the encoder sees it (None: cut off by
    truncation, or no sub-token at all)."""
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    first: dict[int, int] = {}
    for pos, w in enumerate(enc.word_ids()):
        if w is not None and w not in first:
            first[w] = pos
    return [first.get(w) for w in range(len(words))]


def decode_encoder(runner: Runner, spec: HeadSpec, logits: torch.Tensor, example: Example) -> Prediction:
    """A row's head logits -> its prediction: the most probable label and its probability,
    or one tag per word read at the word's first sub-token ("O" where there is none)."""
    if spec.kind == "sequence":
        conf, idx = logits.float().softmax(-1).max(-1)
        return Prediction(spec.labels[int(idx)], True, score=float(conf))
    tags = logits.argmax(-1).tolist()  # [T]
    first = first_subtokens(runner.tokenizer, list(example.inputs["tokens"]), runner.max_length)
    return Prediction([spec.labels[tags[p]] if p is not None else "O" for p in first], True)


@torch.no_grad()
def predict_encoder(runner: Runner, task: Task, examples: list[Example], batch_size: int = 64) -> list[Prediction]:
    runner.eval()
    spec = runner.heads[task.name].spec
    out: list[Prediction] = []
    for chunk in _chunks(examples, batch_size):
        out += [decode_encoder(runner, spec, row, ex) for row, ex in zip(encoder_logits(runner, chunk), chunk)]
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
