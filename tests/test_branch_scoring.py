"""Continuations of one prompt scored in one prefill (serve/branch_scoring.py), against
Hugging Face + PEFT run on prompt + continuation alone."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tasktune.serve.branch_scoring import InvalidBranches, pack_branches
from tasktune.serve.engine import Request
from tasktune.serve.forward_batch import tree_batch
from tasktune.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def hf_scores(tiny_llama, adapter_root):
    """(prompt ids, continuation ids, adapter) -> each continuation token's log-probability
    from HF + PEFT over prompt + continuation (fp32)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_root / "task-3", adapter_name="task-3")

    def scores(prompt: list[int], cont: list[int], adapter: str | None) -> list[float]:
        ids = torch.tensor([prompt + cont])
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter():
                    logits = model(input_ids=ids).logits[0]
            else:
                logits = model(input_ids=ids).logits[0]
        logp = logits[len(prompt) - 1:-1].float().log_softmax(-1)
        return logp.gather(-1, torch.tensor(cont)[:, None]).squeeze(-1).tolist()

    return scores


@pytest.mark.parametrize("adapter", [None, "task-3"])
def test_branches_equal_each_continuation_scored_alone(engine, hf_scores, adapter):
    """Branches of different lengths, one a prefix of another, two sharing a first token:
    each branch's log-probabilities are HF's for prompt + that branch alone, and a
    generating request in the same steps keeps its own greedy tokens."""
    tok = engine.tokenizer
    prompt = tok.encode("what is the weather like in paris today")
    branches = [tok.encode(" sunny and warm"), tok.encode(" sunny"), tok.encode(" rain"), [5, 9, 11, 2],
                tok.encode(" rain later tonight maybe")]
    alone = engine.generate([Request("book a table for two", "task-0", SamplingParams(max_tokens=8))])[0]
    got, beside = engine.generate([Request(prompt, adapter, SamplingParams(max_tokens=0), branches=branches),
                                   Request("book a table for two", "task-0", SamplingParams(max_tokens=8))])
    assert beside.token_ids == alone.token_ids
    assert got.finish_reason == "length" and got.token_ids == []
    assert [len(b) for b in got.branch_logprobs] == [len(b) for b in branches]
    for b, lps in zip(branches, got.branch_logprobs):
        assert lps == pytest.approx(hf_scores(prompt, b, adapter), abs=1e-4)
    # the same numbers as the prompt log-probabilities of prompt + branch, one request each
    for b, lps in zip(branches, got.branch_logprobs):
        c = engine.generate([Request(prompt + b, adapter, SamplingParams(max_tokens=0, prompt_logprobs=0))])[0]
        assert lps == pytest.approx([lp.logprob for lp in c.prompt_logprobs[len(prompt):]], abs=1e-5)


@pytest.mark.parametrize("adapter", [None, "task-3"])
def test_padded_branch_step_equals_the_eager_tree(engine, adapter, monkeypatch):
    """The layout a GPU captures (branch_graphs.BranchStep: padded to a bucket, the mask
    built from static rows), run eagerly, gives the eager tree's numbers."""
    from tasktune.serve.branch_scoring import branch_logprobs

    step = engine.branch_step
    prompt = engine.tokenizer.encode("set an alarm for seven")
    branches = [[5, 6], [7], [5, 8, 9, 10]]
    lora_id = engine.pool.acquire(adapter) if adapter else -1
    slot = engine.cache.alloc()
    try:
        want = branch_logprobs(engine.model, engine.cache, engine.pool.stacks, prompt, branches, slot, lora_id)
        monkeypatch.setattr(step, "pad", True)
        assert step.takes(len(prompt) + 7, adapter is not None) and step.bucket(len(prompt) + 7) == 64
        got = step(prompt, branches, slot, lora_id)
        assert [len(g) for g in got] == [2, 1, 4]
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=1e-5)
        long = [[5] * 40, [6, 7] * 20]  # the next bucket (128 rows: the engine's max_len here)
        assert step.bucket(len(prompt) + 80) == 128
        for g, w in zip(step(prompt, long, slot, lora_id),
                        branch_logprobs(engine.model, engine.cache, engine.pool.stacks, prompt, long, slot, lora_id)):
            assert g == pytest.approx(w, abs=1e-5)
    finally:
        engine.cache.free(slot)
        if adapter:
            engine.pool.release(adapter)


def test_tree_batch_positions_cache_rows_and_mask():
    b = tree_batch([7, 8, 9], [[1, 2], [3], [4, 5]], slot=2, lora_id=-1, device=torch.device("cpu"))
    assert b.tokens.tolist() == [7, 8, 9, 1, 2, 3, 4, 5]
    assert b.positions.tolist() == [0, 1, 2, 3, 4, 3, 3, 4]
    assert b.cache_positions.tolist() == list(range(8)) and b.token_slots.tolist() == [2] * 8
    seen = b.mask[0, 0].int().tolist()
    assert seen[2] == [1, 1, 1, 0, 0, 0, 0, 0]  # the prompt is causal
    assert seen[4] == [1, 1, 1, 1, 1, 0, 0, 0]  # a branch sees the prompt and its own tokens
    assert seen[5] == [1, 1, 1, 0, 0, 1, 0, 0]
    assert seen[7] == [1, 1, 1, 0, 0, 0, 1, 1]


def test_pack_branches_fills_each_slot_in_order():
    assert pack_branches(4, [2, 3, 1, 4], max_len=9) == [[0, 1], [2, 3]]
    assert pack_branches(4, [1, 1, 1], max_len=100) == [[0, 1, 2]]
    with pytest.raises(InvalidBranches, match=r"continuation 1 \(7 tokens\) exceed this server's limit of 10"):
        pack_branches(4, [2, 7], max_len=10)


@pytest.mark.parametrize("params, branches, message", [
    (SamplingParams(max_tokens=2), [[1, 2]], "max_tokens must be 0"),
    (SamplingParams(max_tokens=0, prompt_logprobs=1), [[1, 2]], "prompt_logprobs unset"),
    (SamplingParams(max_tokens=0), [], "at least one continuation"),
    (SamplingParams(max_tokens=0), [[1], []], r"branches\[1\] is empty"),
    (SamplingParams(max_tokens=0), [[1, 10 ** 9]], r"branches\[0\] has token ids outside the vocabulary"),
    (SamplingParams(max_tokens=0), [[1] * 100, [2] * 100], "have 205 tokens; this server's limit is 127"),
])
def test_unusable_branches_are_refused_at_submit(engine, params, branches, message):
    with pytest.raises(InvalidBranches, match=message):
        engine.submit(Request([1, 5, 6, 7, 8], None, params, branches=branches))
    assert not engine.has_work


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_branches_on_the_gpu_equal_hf(tiny_llama, adapter_root):
    """bf16 on a GPU, beside greedy requests decoding from CUDA graphs: each branch's
    log-probabilities are HF + PEFT's (bf16, same device) for prompt + branch, within
    bf16's rounding."""
    from tasktune.serve.engine import Engine

    eng = Engine.from_pretrained(tiny_llama, adapter_root=adapter_root, max_resident=4, max_rank=8,
                                 max_running=8, max_len=128, device="cuda", dtype=torch.bfloat16)
    eng.pool.register_root()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.bfloat16).cuda().eval()
    model = PeftModel.from_pretrained(base, adapter_root / "task-2", adapter_name="task-2")
    tok = eng.tokenizer
    prompt = tok.encode("is it raining in the city")
    branches = [tok.encode(" yes"), tok.encode(" no"), tok.encode(" not today, maybe tomorrow")]
    greedy = [Request("book a table", "task-1", SamplingParams(max_tokens=12)),
              Request("play the beatles", None, SamplingParams(max_tokens=12))]
    alone = eng.generate(greedy)
    out = eng.generate([greedy[0], Request(prompt, "task-2", SamplingParams(max_tokens=0), branches=branches), greedy[1]])
    assert [c.token_ids for c in alone] == [out[0].token_ids, out[2].token_ids]
    for b, lps in zip(branches, out[1].branch_logprobs):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + b], device="cuda")).logits[0]
        ref = logits[len(prompt) - 1:-1].float().log_softmax(-1).gather(-1, torch.tensor(b, device="cuda")[:, None])
        assert lps == pytest.approx(ref.squeeze(-1).tolist(), abs=0.05)
