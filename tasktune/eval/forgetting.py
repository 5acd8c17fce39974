"""Forgetting: general ability before and after tuning, reported as deltas.

"Before" is the same runner with every row routed to no adapter (-1): the frozen base.
For `full` fine-tuning, pass the untouched base model's runner as `base_runner`.
- causal LMs: perplexity on a held-out general English text shipped with the package
  (written for tasktune, not seen in training);
- encoders: cosine similarity between the base and tuned sentence embeddings (mean
  pooled) of the same text. 1.0 means the representation is unchanged.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from importlib import resources

import torch

from tasktune.lora.inject import use_adapters
from tasktune.model.runner import Runner


def general_sentences() -> list[str]:
    text = resources.files("tasktune.resources").joinpath("general/heldout.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _route(runner: Runner, ids: torch.Tensor):
    return use_adapters(runner.handle, ids) if runner.handle is not None else nullcontext()


@torch.no_grad()
def perplexity(runner: Runner, sentences: list[str], adapter: int) -> float:
    tok, total, count = runner.tokenizer, 0.0, 0
    for text in sentences:
        ids = tok(text, return_tensors="pt").input_ids.to(runner.device)
        route = torch.full((1,), adapter, dtype=torch.long, device=runner.device)
        with _route(runner, route):
            logits = runner.model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total, count = total + float(loss), count + ids.shape[1] - 1
    return math.exp(total / max(count, 1))


@torch.no_grad()
def embeddings(runner: Runner, sentences: list[str], adapter: int) -> torch.Tensor:
    enc = runner.tokenizer(sentences, return_tensors="pt", padding=True, truncation=True, max_length=runner.max_length)
    enc = {k: v.to(runner.device) for k, v in enc.items()}
    route = torch.full((len(sentences),), adapter, dtype=torch.long, device=runner.device)
    with _route(runner, route):
        hidden = runner.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def forgetting_report(runner: Runner, base_runner: Runner | None = None) -> dict[str, dict[str, float]]:
    """Per adapter (or 'model' for full fine-tuning): before, after and delta."""
    sentences = general_sentences()
    runner.eval()
    targets = {name: runner.handle.index(name) for name in runner.plan.adapters} if runner.handle else {"model": -1}
    base = base_runner or runner
    out: dict[str, dict[str, float]] = {}
    if runner.family == "causal":
        before = perplexity(base, sentences, -1)
        for name, idx in targets.items():
            after = perplexity(runner, sentences, idx)
            out[name] = {"metric": "perplexity", "before": before, "after": after, "delta": after - before}
    else:
        ref = embeddings(base, sentences, -1)
        for name, idx in targets.items():
            sim = torch.nn.functional.cosine_similarity(ref, embeddings(runner, sentences, idx), dim=-1).mean()
            out[name] = {"metric": "embedding_cosine", "before": 1.0, "after": float(sim), "delta": float(sim) - 1.0}
    return out
