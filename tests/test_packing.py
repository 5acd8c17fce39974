"""Packing: each packed example computes exactly what it computes alone, on a real Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from tasktune.data.collate import pad_causal, pad_encoder
from tasktune.data.packing import block_causal_mask, pack_examples, plan_rows
from tasktune.data.tokenize import IGNORE, encode_causal, encode_encoder
from tasktune.errors import TasktuneError
from tasktune.tasks.spec import Rendered

TEXTS = [
    ("classify the intent: play the beatles\nintent:", " play_music"),
    ("what is the weather in paris tomorrow? yes or no:", " yes"),
    ("summarize the dialogue between person1 and person2 about the meeting\nsummary:", " the meeting is tomorrow"),
]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    models = {impl: LlamaForCausalLM.from_pretrained(tiny_llama, attn_implementation=impl).eval() for impl in ("eager", "sdpa")}
    examples = [encode_causal(tok, Rendered(p, t, 0), max_length=128) for p, t in TEXTS]
    return tok, models, examples


def alone(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]  # [T, V]


def packed_logits(model, batch, mask, use_cache: bool = False) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, use_cache=use_cache)
        return out.logits


def test_plan_rows_ffd_and_greedy() -> None:
    lengths = [5, 4, 3, 3, 2, 1]
    assert plan_rows(lengths, 8, "ffd") == [[0, 2], [1, 3, 5], [4]]
    assert plan_rows(lengths, 8, "greedy") == [[0], [1, 2], [3, 4, 5]]
    with pytest.raises(TasktuneError, match="example 1 has 9 tokens"):
        plan_rows([3, 9], 8)


def test_pack_layout(llama) -> None:
    tok, _, examples = llama
    batch = pack_examples(examples, max_tokens=512, task_ids=[4, 7, 2], pad_id=tok.pad_token_id, order="greedy")
    lens = [len(e) for e in examples]
    assert batch.input_ids.shape == (1, sum(lens)) and batch.seq_lens == [lens] and batch.row_examples == [[0, 1, 2]]
    expected_pos = [p for n in lens for p in range(n)]
    assert batch.position_ids[0].tolist() == expected_pos
    assert batch.segment_ids[0].tolist() == [s for s, n in enumerate(lens) for _ in range(n)]
    assert batch.token_task[0].tolist() == [t for t, n in zip([4, 7, 2], lens) for _ in range(n)]
    assert batch.input_ids[0].tolist() == [i for e in examples for i in e.input_ids]
    # labels: the examples' own labels, and each example's first token never a target
    expected_labels = [IGNORE if k == 0 else lab for e in examples for k, lab in enumerate(e.labels)]
    assert batch.labels[0].tolist() == expected_labels
    assert batch.num_tokens == sum(lens)


def test_block_causal_mask_small() -> None:
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = block_causal_mask(seg, torch.bool)[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only itself
    ]
    additive = block_causal_mask(seg, torch.float32)[0, 0]
    assert additive.shape == (6, 6)
    assert torch.equal(additive == 0, torch.tensor(m, dtype=torch.bool))
    assert additive.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_equals_alone_and_examples_are_isolated(llama, impl) -> None:
    tok, models, examples = llama
    model = models[impl]
    batch = pack_examples(examples, max_tokens=512, task_ids=[0, 1, 2], pad_id=tok.pad_token_id, order="greedy")
    logits = packed_logits(model, batch, batch.attention_mask())  # [1, T, V]
    start = 0
    for ex in examples:
        n = len(ex)
        torch.testing.assert_close(logits[0, start : start + n], alone(model, ex.input_ids), rtol=1e-5, atol=1e-5)
        start += n
    # perturb example 1's tokens: examples 0 and 2 must not move, example 1 must
    perturbed = batch.input_ids.clone()
    s1, n1 = len(examples[0]), len(examples[1])
    perturbed[0, s1 : s1 + n1] = (perturbed[0, s1 : s1 + n1] + 17) % len(tok)
    with torch.no_grad():
        out = model(input_ids=perturbed, attention_mask=batch.attention_mask(), position_ids=batch.position_ids).logits
    torch.testing.assert_close(out[0, :s1], logits[0, :s1], rtol=0, atol=0)
    torch.testing.assert_close(out[0, s1 + n1 :], logits[0, s1 + n1 :], rtol=0, atol=0)
    assert not torch.allclose(out[0, s1 : s1 + n1], logits[0, s1 : s1 + n1])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padded_rows_ffd(llama, impl) -> None:
    """Several rows with padding: real tokens still match, padding stays finite."""
    tok, models, examples = llama
    model = models[impl]
    many = examples * 2
    budget = max(len(e) for e in many) + 5
    batch = pack_examples(many, max_tokens=budget, task_ids=list(range(6)), pad_id=tok.pad_token_id)
    assert batch.input_ids.shape[0] > 1 and (batch.segment_ids == -1).any()
    assert ((batch.segment_ids == -1) == (batch.token_task == -1)).all()
    assert (batch.labels[batch.segment_ids == -1] == IGNORE).all()
    logits = packed_logits(model, batch, batch.attention_mask())
    assert torch.isfinite(logits).all()
    for b, row in enumerate(batch.row_examples):
        start = 0
        for i in row:
            n = len(many[i])
            torch.testing.assert_close(logits[b, start : start + n], alone(model, many[i].input_ids), rtol=1e-5, atol=1e-5)
            start += n


def test_mask_forms_in_this_transformers(llama) -> None:
    """What the packing docstring claims: sdpa takes a bool mask, eager needs the
    additive one (a bool mask is added as 0/1 and isolates nothing), and transformers
    infers packing from restarting position ids when attention_mask is None and no
    cache is in use."""
    tok, models, examples = llama
    batch = pack_examples(examples, max_tokens=512, pad_id=tok.pad_token_id, order="greedy")
    reference = packed_logits(models["sdpa"], batch, batch.attention_mask())
    torch.testing.assert_close(packed_logits(models["sdpa"], batch, batch.attention_mask(torch.bool)), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_logits(models["sdpa"], batch, None), reference, rtol=1e-5, atol=1e-5)
    # ... but only without a cache: use_cache=True (the default) skips that detection
    assert not torch.allclose(packed_logits(models["sdpa"], batch, None, use_cache=True), reference, atol=1e-3)
    # the explicit 4-D mask does not care
    torch.testing.assert_close(packed_logits(models["sdpa"], batch, batch.attention_mask(), use_cache=True), reference)
    wrong = packed_logits(models["eager"], batch, batch.attention_mask(torch.bool))
    assert not torch.allclose(wrong, reference, atol=1e-3)


def test_pad_causal_matches_alone(llama) -> None:
    tok, models, examples = llama
    padded = pad_causal(examples, tok.pad_token_id, task_ids=[0, 1, 2])
    lens = [len(e) for e in examples]
    assert padded.input_ids.shape == (3, max(lens)) and padded.attention_mask.sum(1).tolist() == lens
    assert padded.num_tokens == sum(lens)
    with torch.no_grad():
        logits = models["sdpa"](input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits
    for i, ex in enumerate(examples):
        torch.testing.assert_close(logits[i, : len(ex)], alone(models["sdpa"], ex.input_ids), rtol=1e-5, atol=1e-5)
    assert (padded.labels[0, lens[0] :] == IGNORE).all()


def test_pad_encoder(tiny_bert) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    encs = [encode_encoder(tok, ["play", "beatles"], 16, tags=[1, 2]), encode_encoder(tok, ["paris"], 16, tags=[3])]
    batch = pad_encoder(encs, tok.pad_token_id, task_ids=[5, 6])
    assert batch.input_ids.tolist()[1][3:] == [tok.pad_token_id]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.labels.tolist() == [[IGNORE, 1, 2, IGNORE], [IGNORE, 3, IGNORE, IGNORE]]
    assert batch.task_ids.tolist() == [5, 6]
