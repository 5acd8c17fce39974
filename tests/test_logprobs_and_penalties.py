"""Log-probabilities, penalties, logit bias and vLLM's sampling extras through the engine,
against Hugging Face + PEFT.

Every reference is recomputed from the HF model's own logits over the prompt and the
tokens generated so far, so these check the numbers, not just the shapes.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasktune.serve.engine import Engine, Request
from tasktune.serve.guided import constrain_rows, next_tokens
from tasktune.serve.sampling import (LOGPROB_FLOOR, SamplingParams, cumsum_rows, draw, logprobs_of, sample,
                                     sampling_probs, sampling_probs_rows, shape_logits)

from tiny_models import PROMPTS  # noqa: F401


@pytest.fixture(scope="module")
def hf(tiny_llama, adapter_root):
    """(prompt ids + tokens so far, adapter) -> HF + PEFT's next-token logits [V] (fp32)."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_root / "task-0", adapter_name="task-0")
    model.load_adapter(adapter_root / "task-5", adapter_name="task-5")

    def logits(ids: list[int], adapter: str | None) -> torch.Tensor:
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter():
                    return model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            model.set_adapter(adapter)
            return model(input_ids=torch.tensor([ids])).logits[0, -1].float()

    return tok, logits


@pytest.mark.parametrize("adapter", [None, "task-5"])
def test_greedy_logprobs_equal_hf_log_softmax(engine, hf, adapter):
    tok, logits = hf
    prompt = "book a table for two"
    plain = engine.generate([Request(prompt, adapter, SamplingParams(max_tokens=6))])[0]
    c = engine.generate([Request(prompt, adapter, SamplingParams(max_tokens=6, logprobs=3))])[0]
    assert c.token_ids == plain.token_ids  # asking for logprobs does not change the tokens
    assert len(c.logprobs) == len(c.token_ids)
    ids = tok.encode(prompt)
    for lp, t in zip(c.logprobs, c.token_ids):
        ref = torch.log_softmax(logits(ids, adapter), -1)
        assert lp.token == t
        assert lp.logprob == pytest.approx(ref[t].item(), abs=1e-4)
        top = ref.topk(3)
        assert [i for i, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        ids = ids + [t]


def test_greedy_logprobs_ride_the_device_path_with_arrivals(engine, hf):
    """Greedy requests that ask for logprobs keep the device-side path (steps launched
    ahead, rows joining from prefills); each one's logprobs equal HF's at its own prefixes."""
    tok, logits = hf
    jobs = [("set an alarm", "task-0", 2), ("play jazz", None, None), ("what is the weather", "task-5", 0),
            ("order a pizza", "task-0", 4)]
    used = engine.decode_step.ahead_used
    seqs = [engine.submit(Request(p, a, SamplingParams(max_tokens=7, logprobs=k))) for p, a, k in jobs[:2]]
    engine.step()
    engine.step()
    seqs += [engine.submit(Request(p, a, SamplingParams(max_tokens=7, logprobs=k))) for p, a, k in jobs[2:]]
    while engine.has_work:
        engine.step()
    assert engine.decode_step.ahead_used > used
    for seq, (prompt, adapter, k) in zip(seqs, jobs):
        if k is None:
            assert seq.logprobs == []
            continue
        ids = tok.encode(prompt)
        assert len(seq.logprobs) == len(seq.output_ids) == 7
        for lp, t in zip(seq.logprobs, seq.output_ids):
            ref = torch.log_softmax(logits(ids, adapter), -1)
            assert lp.token == t and lp.logprob == pytest.approx(ref[t].item(), abs=1e-4)
            assert [i for i, _ in lp.top] == ref.topk(k).indices.tolist()
            ids = ids + [t]


def test_logprobs_of_sampled_rows_and_mixed_batches(engine, hf):
    """A sampled request's logprobs are the raw distribution's at the token it drew; rows
    that ask for none share the batch unchanged."""
    tok, logits = hf
    reqs = [Request(PROMPTS[0], "task-0", SamplingParams(max_tokens=5, temperature=0.9, seed=3, logprobs=0)),
            Request(PROMPTS[1], None, SamplingParams(max_tokens=5)),
            Request(PROMPTS[2], "task-5", SamplingParams(max_tokens=5, logprobs=1))]
    out = engine.generate(reqs)
    assert out[1].logprobs is None
    assert out[1].token_ids == engine.generate([reqs[1]])[0].token_ids
    for r, c in ((reqs[0], out[0]), (reqs[2], out[2])):
        ids = tok.encode(r.prompt)
        for lp, t in zip(c.logprobs, c.token_ids):
            assert lp.logprob == pytest.approx(torch.log_softmax(logits(ids, r.adapter), -1)[t].item(), abs=1e-4)
            assert len(lp.top) == r.params.logprobs
            ids = ids + [t]


def test_penalties_and_bias_follow_openai_formula_against_hf(engine, hf):
    """Greedy with penalties equals a greedy loop over HF's logits with OpenAI's formula:
    logit - frequency * count - presence * (count > 0) + bias, counts over generated tokens."""
    tok, logits = hf
    params = SamplingParams(max_tokens=12, presence_penalty=0.5, frequency_penalty=1.5, logit_bias=((7, 2.0),))
    prompt = "play some music by the beatles"
    c = engine.generate([Request(prompt, "task-0", params)])[0]
    ids, want = tok.encode(prompt), []
    for _ in range(len(c.token_ids)):
        row = logits(ids + want, "task-0")
        counts = torch.bincount(torch.tensor(want, dtype=torch.long), minlength=row.shape[0]).float()
        row = row - 1.5 * counts - 0.5 * (counts > 0).float()
        row[7] += 2.0
        want.append(int(row.argmax()))
    assert c.token_ids == want
    plain = engine.generate([Request(prompt, "task-0", SamplingParams(max_tokens=12))])[0]
    assert len(set(c.token_ids)) > len(set(plain.token_ids)) or c.token_ids != plain.token_ids


def test_logit_bias_forces_a_token(engine):
    c = engine.generate([Request("hello", None, SamplingParams(max_tokens=4, logit_bias=((11, 100.0),),
                                                               ignore_eos=True))])[0]
    assert c.token_ids == [11, 11, 11, 11]


def test_processors_and_logprobs_alone():
    row = torch.tensor([0.0, 1.0, 2.0, 3.0])
    p = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, logit_bias=((0, 4.0),))
    assert shape_logits(row, p, [3, 3, 1]).tolist() == [4.0, 1.0 - 1.5, 2.0, 3.0 - 2.0]
    assert row.tolist() == [0.0, 1.0, 2.0, 3.0]  # the raw logits are not touched
    logits = torch.tensor([[0.0, float("-inf"), 1.0], [2.0, 2.0, 0.0]])
    out = logprobs_of(logits, [1, 2], [2, 0])
    assert out[0].logprob == LOGPROB_FLOOR  # -inf has no JSON form
    assert [i for i, _ in out[0].top] == [2, 0] and out[1].top == ()
    assert out[1].logprob == pytest.approx(torch.log_softmax(logits[1], -1)[2].item())
    tokens, lps = sample(logits, [SamplingParams(logprobs=1), p], [None, None], [[], [0]])
    assert tokens == [2, 0] and lps[1] is None and lps[0].token == 2


def test_repetition_penalty_equals_hf_generate(engine, tiny_llama, adapter_root):
    """HF's RepetitionPenaltyLogitsProcessor (over prompt and output) is the reference."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_root / "task-3")
    for prompt in ("play the beatles", "book a table for two at eight"):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            ref = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, repetition_penalty=1.8,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        c = engine.generate([Request(prompt, "task-3", SamplingParams(max_tokens=10, repetition_penalty=1.8))])[0]
        assert c.token_ids == ref
        plain = engine.generate([Request(prompt, "task-3", SamplingParams(max_tokens=10))])[0]
        assert plain.token_ids != ref  # (the penalty changed something)


def test_min_tokens_stop_token_ids_top_k_and_min_p(engine):
    eos = engine.tokenizer.eos_token_id
    forced = SamplingParams(max_tokens=8, logit_bias=((eos, 100.0),), min_tokens=3)
    c = engine.generate([Request("hello there", None, forced)])[0]
    assert len(c.token_ids) == 4 and eos not in c.token_ids[:3] and c.token_ids[3] == eos
    assert c.finish_reason == "stop"
    plain = engine.generate([Request("hello there", "task-1", SamplingParams(max_tokens=8, ignore_eos=True))])[0]
    stop_at = plain.token_ids[3]
    first = plain.token_ids.index(stop_at)
    c = engine.generate([Request("hello there", "task-1", SamplingParams(max_tokens=8, stop_token_ids=(stop_at,),
                                                                          ignore_eos=True))])[0]
    assert c.token_ids == plain.token_ids[:first + 1] and c.finish_reason == "stop"
    assert c.text == engine.tokenizer.decode(plain.token_ids[:first], skip_special_tokens=True)
    greedy = engine.generate([Request("what time is it", "task-2", SamplingParams(max_tokens=6))])[0].token_ids
    for seed in (1, 2):
        for kw in ({"top_k": 1}, {"min_p": 1.0}):
            p = SamplingParams(max_tokens=6, temperature=1.5, seed=seed, **kw)
            assert engine.generate([Request("what time is it", "task-2", p)])[0].token_ids == greedy, kw


def test_processor_order_and_filters():
    row = torch.tensor([2.0, -1.0, 0.5, 4.0])
    p = SamplingParams(repetition_penalty=2.0, logit_bias=((1, 3.0),), min_tokens=2)
    out = shape_logits(row, p, [3], prompt=[1], end_ids=(2,))
    # bias first (-1 + 3 = 2, then / 2 = 1), token 2 barred (1 token < min_tokens), 3 seen: 4 / 2
    assert out.tolist() == [2.0, 1.0, float("-inf"), 2.0]
    assert shape_logits(row, p, [3, 0], prompt=[1], end_ids=(2,))[2] == 0.5  # min_tokens reached
    neg = shape_logits(torch.tensor([-2.0]), SamplingParams(repetition_penalty=2.0), [0])
    assert neg.tolist() == [-4.0]
    probs = sampling_probs(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), SamplingParams(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [True, True, False, False]
    probs = sampling_probs(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), SamplingParams(temperature=1.0, min_p=0.4))
    assert (probs > 0).tolist() == [True, True, False, False]  # 0.15 < 0.4 x 0.5


@pytest.mark.parametrize("kw, message", [
    ({"logprobs": 21}, "logprobs"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"logit_bias": ((1, 101.0),)}, "logit_bias"),
    ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 20, "max_tokens": 4}, "min_tokens"), ({"stop_token_ids": (-1,)}, "stop_token_ids"),
])
def test_bad_params_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_logprobs_on_the_gpu_paths_equal_hf(tiny_llama, adapter_root):
    """bf16 on a GPU, prefill and decode from CUDA graphs: a greedy request that asks for
    logprobs takes the logits path; its logprobs are HF + PEFT's (bf16, same device) at
    the same prefixes, within bf16's rounding."""
    eng = Engine.from_pretrained(tiny_llama, adapter_root=adapter_root, max_resident=4, max_rank=8,
                                 max_running=8, max_len=128, device="cuda", dtype=torch.bfloat16)
    eng.pool.register_root()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.bfloat16).cuda().eval()
    model = PeftModel.from_pretrained(base, adapter_root / "task-2", adapter_name="task-2")
    reqs = [Request(p, a, SamplingParams(max_tokens=8, logprobs=2)) for p, a in
            (("book a table", "task-2"), ("play the beatles", None), ("is it raining", "task-2"))]
    for c, r in zip(eng.generate(reqs), reqs):
        ids = tok.encode(r.prompt)
        for lp, t in zip(c.logprobs, c.token_ids):
            with torch.no_grad():
                if r.adapter is None:
                    with model.disable_adapter():
                        logits = model(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1]
                else:
                    logits = model(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1]
            ref = torch.log_softmax(logits.float(), -1)
            assert lp.logprob == pytest.approx(ref[t].item(), abs=0.05)
            assert ref[t] >= ref.max() - 0.05  # greedy: the (near-)top token
            assert len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1]
            ids = ids + [t]
    # a prompt's log-probabilities (an eager prefill that keeps every position) and a guided row
    choices = tuple(tuple(tok(a, add_special_tokens=False)["input_ids"]) for a in ("yes", "no", "maybe later"))
    scored, guided = eng.generate([
        Request("book a table for two", "task-2", SamplingParams(max_tokens=2, prompt_logprobs=1)),
        Request("is it raining", "task-2", SamplingParams(max_tokens=12, choices=choices))])
    ids = tok.encode("book a table for two")
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=torch.tensor([ids], device="cuda")).logits[0].float(), -1)
    assert [lp.logprob for lp in scored.prompt_logprobs[1:]] == pytest.approx(
        [ref[t - 1, ids[t]].item() for t in range(1, len(ids))], abs=0.05)
    assert tuple(guided.token_ids[:-1]) in choices and guided.finish_reason == "stop"


@pytest.mark.parametrize("adapter", [None, "task-5"])
def test_prompt_logprobs_equal_hf_log_softmax_at_every_prompt_position(engine, hf, adapter, monkeypatch):
    """prompt_logprobs (OpenAI's echo + logprobs): token t's entry is HF's log-softmax at the
    prefix before it, with the same top-k; the first token has none. The LM head runs over
    a few positions at a time (SCORING_ROWS), which must not change a value. max_tokens=0
    scores the prompt and generates nothing."""
    from tasktune.serve import prompt_scoring

    chunk = 3
    monkeypatch.setattr(prompt_scoring, "SCORING_ROWS", chunk)
    tok, logits = hf
    prompt = "remind me to call my sister tomorrow at noon"
    ids = tok.encode(prompt)
    scored, plain = engine.generate([Request(prompt, adapter, SamplingParams(max_tokens=0, prompt_logprobs=2)),
                                     Request("play jazz", "task-0", SamplingParams(max_tokens=3))])
    assert scored.token_ids == [] and scored.text == "" and scored.finish_reason == "length"
    assert len(scored.prompt_logprobs) == len(ids) > 2 * chunk
    assert scored.prompt_logprobs[0] is None
    for t in range(1, len(ids)):
        ref = torch.log_softmax(logits(ids[:t], adapter), -1)
        lp = scored.prompt_logprobs[t]
        assert lp.token == ids[t] and lp.logprob == pytest.approx(ref[ids[t]].item(), abs=1e-4)
        assert lp.rank == int((ref > ref[ids[t]]).sum()) + 1  # (no ties in these fp32 logits)
        assert [i for i, _ in lp.top] == ref.topk(2).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(ref.topk(2).values.tolist(), abs=1e-4)
    # the request beside it in that prefill, and generation after scoring, are unchanged
    assert plain.token_ids == engine.generate([Request("play jazz", "task-0", SamplingParams(max_tokens=3))])[0].token_ids
    both = engine.generate([Request(prompt, adapter, SamplingParams(max_tokens=4, prompt_logprobs=0, logprobs=0))])[0]
    alone = engine.generate([Request(prompt, adapter, SamplingParams(max_tokens=4))])[0]
    assert both.token_ids == alone.token_ids and len(both.logprobs) == 4
    assert [lp.logprob for lp in both.prompt_logprobs[1:]] == pytest.approx(
        [lp.logprob for lp in scored.prompt_logprobs[1:]], abs=1e-5)
    assert all(lp.top == () for lp in both.prompt_logprobs[1:])



def test_prompt_logprobs_and_max_tokens_bounds():
    SamplingParams(max_tokens=0)  # the prompt only
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)


def test_next_tokens_follow_the_answers_token_paths():
    choices, eos = ((1, 2, 3), (1, 2), (4,)), {0, 9}
    assert next_tokens(choices, [], eos) == [1, 4]
    assert next_tokens(choices, [1], eos) == [2]
    assert next_tokens(choices, [1, 2], eos) == [0, 3, 9]  # (1, 2) is whole: it may end, or go on to (1, 2, 3)
    assert next_tokens(choices, [4], eos) == [0, 9]
    # several rows at once, each kept to its own next tokens; no end token known: left as it is
    logits = torch.randn(4, 10)
    gens, rows = [[], [1, 2], [4], []], [3, 0, 2, 1]
    together = constrain_rows(logits, rows, [choices] * 3 + [((5,),)], gens, eos)
    for j, (r, g) in enumerate(zip(rows, gens)):
        allowed = next_tokens(choices if j < 3 else ((5,),), g, eos)
        assert torch.isinf(together[j]).nonzero().flatten().tolist() == [t for t in range(10) if t not in allowed]
        assert torch.equal(together[j, allowed], logits[r, allowed])
    assert torch.equal(constrain_rows(logits, [1], [((5,),)], [[5]], ()), logits[1:2])
    with pytest.raises(ValueError, match="choices"):
        SamplingParams(choices=((1,),), min_tokens=1)
    with pytest.raises(ValueError, match="choices"):
        SamplingParams(choices=((),))


@pytest.mark.parametrize("adapter", [None, "task-5"])
def test_guided_choice_equals_a_constrained_greedy_loop_over_hf_logits(engine, hf, adapter):
    """A row bound to answers takes, each step, the argmax of HF's logits over the tokens
    that continue an answer (the end token once one is whole); it ends on an answer, its
    logprobs are the raw distribution's, and rows beside it are unchanged."""
    tok, logits = hf
    answers = ["play music", "set an alarm", "book a table", "play"]
    choices = tuple(tuple(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    prompt = "what should i do now"
    eos = engine.eos_ids
    guided, free = engine.generate([
        Request(prompt, adapter, SamplingParams(max_tokens=12, choices=choices, logprobs=0)),
        Request(prompt, adapter, SamplingParams(max_tokens=5))])
    ids, want, raw = tok.encode(prompt), [], []
    while True:
        row = logits(ids + want, adapter)
        ok = [c[len(want)] for c in choices if len(c) > len(want) and list(c[:len(want)]) == want]
        ok += sorted(eos) if any(list(c) == want for c in choices) else []
        t = max(ok, key=lambda i: row[i].item())
        raw.append(torch.log_softmax(row, -1)[t].item())
        want.append(t)
        if t in eos:
            break
    assert guided.token_ids == want and tuple(want[:-1]) in choices and guided.finish_reason == "stop"
    assert [lp.logprob for lp in guided.logprobs] == pytest.approx(raw, abs=1e-4)
    assert free.token_ids == engine.generate([Request(prompt, adapter, SamplingParams(max_tokens=5))])[0].token_ids


def test_sampled_guided_choice_always_ends_on_an_answer(engine):
    answers = ["yes", "no", "maybe later"]
    choices = tuple(tuple(engine.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    reqs = [Request("is it raining", "task-1", SamplingParams(max_tokens=16, temperature=1.5, seed=s, choices=choices))
            for s in range(12)]
    outs = engine.generate(reqs)
    assert all(tuple(c.token_ids[:-1]) in choices and c.finish_reason == "stop" for c in outs)
    assert len({c.text for c in outs}) > 1  # (it samples)


def test_batched_sampling_filters_equal_one_row_at_a_time_and_draws_follow_the_distribution():
    """sampling_probs_rows (every row's own temperature, top-k, top-p, min-p) equals
    sampling_probs row by row; `draw`'s exponential race picks token i with probability p_i,
    and a seeded row draws the same token whatever rows share its batch."""
    torch.manual_seed(0)
    rows = torch.randn(5, 50) * 3
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
              SamplingParams(temperature=1.0, top_p=0.6), SamplingParams(temperature=0.9, min_p=0.2, top_k=40),
              SamplingParams(temperature=1e-300)]
    plain = [0, 1, 3, 4]
    together, order = sampling_probs_rows(rows[plain], [params[j] for j in plain])
    assert order is None
    for i, j in enumerate(plain[:3]):
        alone = sampling_probs(rows[j], params[j])
        assert torch.allclose(together[i] / together[i].sum(), alone / alone.sum(), atol=1e-6), j
    assert together[3].tolist() == torch.nn.functional.one_hot(rows[4].argmax(), 50).float().tolist()  # ~greedy
    nucleus = [SamplingParams(temperature=1.0, top_p=0.6), SamplingParams(temperature=0.8, top_p=0.9, min_p=0.05)]
    ranked, order = sampling_probs_rows(rows[[2, 3]], nucleus, nucleus=True)  # sorted, most likely first
    assert (ranked[:, :-1] >= ranked[:, 1:]).all()
    back = torch.zeros_like(ranked).scatter_(1, order, ranked)
    for i, (j, p) in enumerate(zip((2, 3), nucleus)):
        alone = sampling_probs(rows[j], p)
        assert torch.allclose(back[i] / back[i].sum(), alone / alone.sum(), atol=1e-6), j
    x = torch.rand(3, 1000)
    assert torch.allclose(cumsum_rows(x, chunk=128), x.cumsum(-1), atol=1e-4)  # (1000 = 7 chunks + 104)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    gens = [torch.Generator().manual_seed(s) for s in range(n)]
    tokens = draw(p.log().expand(n, 4).contiguous(), [SamplingParams(temperature=1.0)] * n, gens)
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert torch.allclose(freq, p, atol=0.03), freq  # (4 standard errors at n = 4000)
    seeded = lambda: torch.Generator().manual_seed(99)  # noqa: E731
    one = draw(rows[:1], [params[0]], [seeded()])
    among = draw(rows[[2, 0, 1]], [params[2], params[0], params[1]], [seeded(), seeded(), seeded()])
    assert one[0] == among[1]
    free = draw(p.log().expand(n, 4).contiguous(), [SamplingParams(temperature=1.0)] * n, [None] * n)
    assert torch.allclose(torch.bincount(free, minlength=4).float() / n, p, atol=0.03)  # unseeded: one draw for all
    nuc = draw(p.log().expand(n, 4).contiguous(), [SamplingParams(temperature=1.0, top_p=0.7)] * n, [None] * n)
    assert torch.allclose(torch.bincount(nuc, minlength=4).float() / n, torch.tensor([0.625, 0.375, 0, 0]), atol=0.03)
    mixed = draw(rows[[1, 0]], [params[1], params[0]], [None, seeded()])
    assert mixed[1] == one[0]
    bad = draw(torch.full((1, 4), float("nan")), [SamplingParams(temperature=1.0)], [seeded()])
    assert bad.tolist() == [torch.full((1, 4), float("nan")).argmax().item()]  # degenerate: the argmax
