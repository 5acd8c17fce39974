"""The serving engine against Hugging Face + PEFT: exact greedy tokens, fp32, CPU.

Eight PEFT adapters (different ranks and scalings) and base-model rows share batches;
requests arrive while others decode; the pool holds fewer adapters than are in use so
admission waits for slots and adapters are evicted and reloaded mid-run.
"""

from __future__ import annotations


import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasktune.lora import triton_ops
from tasktune.serve import triton_linear
from tasktune.serve.engine import Engine, PromptTooLong, Request
from tasktune.serve.sampling import SamplingParams
from tasktune.serve.scheduler import QueueFull

from tiny_models import PROMPTS, make_adapter  # noqa: E402,F401


@pytest.fixture(scope="module")
def reference(tiny_llama, adapter_root):
    """Greedy tokens of HF + PEFT `generate` for one request alone (cached)."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_root / "task-0", adapter_name="task-0")
    for i in range(1, 8):
        model.load_adapter(adapter_root / f"task-{i}", adapter_name=f"task-{i}")
    cache: dict = {}

    def run(prompt: str, adapter: str | None, n: int) -> list[int]:
        key = (prompt, adapter, n)
        if key not in cache:
            ids = torch.tensor([tok.encode(prompt)])
            kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
            with torch.no_grad():
                if adapter is None:
                    with model.disable_adapter():
                        out = model.generate(input_ids=ids, **kw)
                else:
                    model.set_adapter(adapter)
                    out = model.generate(input_ids=ids, **kw)
            cache[key] = out[0, ids.shape[1]:].tolist()
        return cache[key]

    return run


def drain(engine: Engine) -> None:
    for _ in range(10_000):
        if not engine.has_work:
            return
        engine.step()
    raise AssertionError("engine did not finish")


def run_mixed(engine: Engine, reference, short: bool = False) -> None:
    """18 requests over 8 adapters and the base, joining while others decode -> each one's
    greedy tokens equal HF + PEFT's for that request alone. short: 12 requests of 3-8 tokens
    (the Triton interpreter's variants: ~2.5x fewer steps, the same cases)."""
    adapters = [None] + [f"task-{i}" for i in range(8)]
    n_jobs, waves = (12, (5, 8)) if short else (18, (7, 12))
    jobs = [(PROMPTS[i % len(PROMPTS)], adapters[i % len(adapters)], 3 + (i * 5) % 6 if short else 6 + (i * 5) % 11)
            for i in range(n_jobs)]
    seqs = [engine.submit(Request(p, a, SamplingParams(max_tokens=n, ignore_eos=False))) for p, a, n in jobs[:waves[0]]]
    for _ in range(3):
        engine.step()
    seqs += [engine.submit(Request(p, a, SamplingParams(max_tokens=n))) for p, a, n in jobs[waves[0]:waves[1]]]
    engine.step()
    seqs += [engine.submit(Request(p, a, SamplingParams(max_tokens=n))) for p, a, n in jobs[waves[1]:]]
    drain(engine)
    assert engine.cache.free_slots == engine.cache.num_slots
    assert engine.pool.loads > 4  # max_resident 4 < 8 adapters in use: evicted and reloaded
    step = engine.decode_step  # greedy rows: steps launched ahead were taken (arrivals join them)
    assert step.ahead_used > 10
    for (prompt, adapter, n), seq in zip(jobs, seqs):
        assert seq.output_ids == reference(prompt, adapter, n), (prompt, adapter)
        assert seq.finish_reason in ("length", "stop")


def test_arrivals_join_the_step_launched_ahead(engine, reference):
    """A prefill's first tokens go to the next decode step on the device: after a prefill
    alone, when requests arrive while others decode, and when one finishes while others go
    on, every decode step is one launched ahead (none is discarded), and the tokens equal
    HF + PEFT's."""
    step = engine.decode_step
    used, wasted = step.ahead_used, step.ahead_wasted
    first = engine.submit(Request(PROMPTS[0], "task-1", SamplingParams(max_tokens=6)))
    engine.step()  # prefill alone: launches the first decode step
    engine.step()
    later = [engine.submit(Request(PROMPTS[i], a, SamplingParams(max_tokens=5))) for i, a in ((2, None), (3, "task-2"))]
    drain(engine)
    # decode steps: the first request's 5 (tokens 2..6), the arrivals' first 3 in steps shared with it,
    # and their last in a sixth, launched ahead in the step where the first request had its last token
    assert (step.ahead_used - used, step.ahead_wasted - wasted) == (6, 0)
    assert first.output_ids == reference(PROMPTS[0], "task-1", 6)
    assert [s.output_ids for s in later] == [reference(PROMPTS[2], None, 5), reference(PROMPTS[3], "task-2", 5)]


def test_greedy_matches_hf_peft_with_mixed_adapters_and_arrivals(engine, reference):
    assert len({tuple(reference(PROMPTS[1], a, 8)) for a in [None] + [f"task-{i}" for i in range(8)]}) >= 7
    run_mixed(engine, reference)


KERNELS = "" if triton_ops.available("cpu") else "the Triton kernels need TRITON_INTERPRET=1 and Triton on the CPU"


@pytest.mark.parametrize("variant", [
    pytest.param("kernels", marks=pytest.mark.skipif(bool(KERNELS), reason=KERNELS)),
    "compiled",
    pytest.param("compiled+kernels", marks=pytest.mark.skipif(bool(KERNELS), reason=KERNELS)),
    pytest.param("compiled+kernels+linears", marks=pytest.mark.skipif(bool(KERNELS), reason=KERNELS)),
    pytest.param("compiled+kernels+fused", marks=pytest.mark.skipif(bool(KERNELS), reason=KERNELS)),
    pytest.param("kernels+few", marks=pytest.mark.skipif(bool(KERNELS), reason=KERNELS)),
])
def test_gpu_decode_paths_match_hf_peft_on_the_cpu(tiny_llama, adapter_root, reference, variant, monkeypatch):
    """What the GPU runs, on the CPU: the decode step's LoRA and attention through the Triton
    kernels (one LoRA launch pair per fused linear; under the interpreter; +linears: each
    linear with its norm, activation and residual as one triton_linear launch, as a GPU runs
    batches of up to 64, the pair's LoRA delta added inside it; +fused: LoRA inside that
    launch too; +few: LoRA inside it for steps of at most 4 adapters, as a GPU runs them)
    and/or every block through torch.compile (aot_eager: no C compiler needed)
    -> the same greedy tokens."""
    eng = Engine.from_pretrained(tiny_llama, adapter_root=adapter_root, max_resident=4, max_rank=8,
                                 max_running=6, max_waiting=64, max_len=128)
    eng.pool.register_root()
    launches = []
    if "kernels" in variant:
        eng.pool.stacks.kernels = True
        assert {name for _, name in eng.pool.stacks.fused} == {"qkv_proj", "gate_up_proj"}
        assert eng.model.can_use_attention_kernel()
        eng.model.attention_kernel = True
        apply = triton_ops.lora_apply_
        monkeypatch.setattr(triton_ops, "lora_apply_", lambda *a, **k: launches.append(a[6]) or apply(*a, **k))
    fused = []
    if "fused" in variant or "linears" in variant or "few" in variant:
        eng.model.linear_kernel = True
        eng.pool.stacks.fused_linears = "fused" in variant  # LoRA inside them too (off by default: slower on an H200)
        eng.pool.stacks.few_linears = "few" in variant  # ... for steps of <= 4 adapters (off by default)
        linear = triton_linear.decode_linear
        monkeypatch.setattr(triton_linear, "decode_linear", lambda *a, **k: fused.append(
            (k["swiglu"], k["lora"] is not None and k.get("few") is None, k["delta"] is not None,
             k.get("few") is not None)) or linear(*a, **k))
    if "compiled" in variant:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        eng.model.compile_decode(backend="aot_eager")
    run_mixed(eng, reference, short=True)
    if "fused" in variant:  # every decode step: 4 launches a layer (gate_up with silu * up); none of the pair
        assert not launches and len(fused) % 4 == 0 and len(fused) > 0
        assert [sw for sw, *_ in fused[:4]] == [False, False, True, False] and any(lo for _, lo, *_ in fused)
    elif "few" in variant:  # max_resident 4: every step with adapters has at most 4, all inside the launches
        assert not launches and len(fused) % 4 == 0 and not any(lo or d for _, lo, d, _ in fused)
        assert sum(f for *_, f in fused) > 0
    elif "linears" in variant:  # the same 4 launches, each after its pair when the step has adapters
        assert len(fused) % 4 == 0 and not any(lo for _, lo, *_ in fused)
        with_delta = sum(d for _, _, d, _ in fused)
        assert with_delta > 0 and len(launches) == with_delta and [len(b) for b in launches[:4]] == [2, 0, 1, 0]
    elif "kernels" in variant:  # 4 per layer and decode step: fused qkv (2 bounds), o, fused gate_up (1), down
        assert len(launches) % 4 == 0 and len(launches) > 0
        assert [len(b) for b in launches[:4]] == [2, 0, 1, 0]
    if "compiled" in variant:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def test_base_rows_equal_plain_hf_and_generate_returns_in_order(engine, reference):
    reqs = [Request(p, None, SamplingParams(max_tokens=8)) for p in PROMPTS]
    outs = engine.generate(reqs)
    for p, c in zip(PROMPTS, outs):
        assert c.token_ids == reference(p, None, 8)
        assert c.prompt_tokens == len(engine.tokenizer.encode(p))
        assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_a_finished_requests_text_is_decoded_at_its_first_read_not_in_the_step(engine, monkeypatch):
    """The step that finishes a request does not decode its text (the GPU would idle while the
    host decodes a batch's outputs); the first read does, once, and gives the full decode.
    A request with stop strings still decodes in the step (the stops are searched there)."""
    calls = []
    decode = engine.tokenizer.decode
    monkeypatch.setattr(engine.tokenizer, "decode", lambda ids, **kw: calls.append(len(ids)) or decode(ids, **kw))
    plain = engine.submit(Request(PROMPTS[0], "task-1", SamplingParams(max_tokens=5, ignore_eos=True)))
    stopped = engine.submit(Request(PROMPTS[1], None, SamplingParams(max_tokens=5, ignore_eos=True, stop=("@@",))))
    while engine.has_work:
        engine.step()
    assert plain.finished and stopped.finished and 5 in calls  # the stop-string request's full decode
    calls.clear()
    want = decode(list(plain.output_ids), skip_special_tokens=True)
    assert plain.text == want and plain.text == want and calls == [5]  # decoded once, at the first read
    plain.text = "set"
    assert plain.text == "set"


def test_sampling_is_reproducible_with_a_seed(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    alone = engine.generate([Request(PROMPTS[1], "task-2", params)])[0]
    mixed = engine.generate([Request(PROMPTS[0], "task-1", SamplingParams(max_tokens=5, temperature=0.7)),
                             Request(PROMPTS[1], "task-2", params),
                             Request(PROMPTS[2], None, SamplingParams(max_tokens=9))])[1]
    assert alone.token_ids == mixed.token_ids
    other = engine.generate([Request(PROMPTS[1], "task-2", SamplingParams(max_tokens=12, temperature=1.0, seed=7))])[0]
    assert other.token_ids != alone.token_ids
    tiny_p = engine.generate([Request(PROMPTS[3], "task-3", SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-6))])
    greedy = engine.generate([Request(PROMPTS[3], "task-3", SamplingParams(max_tokens=6))])
    assert tiny_p[0].token_ids == greedy[0].token_ids
    tiny_t = engine.generate([Request(PROMPTS[3], "task-3", SamplingParams(max_tokens=6, temperature=1e-300))])
    assert tiny_t[0].token_ids == greedy[0].token_ids


def test_stop_strings_and_max_tokens(engine):
    full = engine.generate([Request(PROMPTS[5], "task-4", SamplingParams(max_tokens=16, ignore_eos=True))])[0]
    assert len(full.token_ids) == 16 and full.finish_reason == "length"
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    cut = engine.generate([Request(PROMPTS[5], "task-4", SamplingParams(max_tokens=16, stop=(stop,)))])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    kept = engine.generate([Request(PROMPTS[5], "task-4", SamplingParams(max_tokens=16, stop=(stop, "\x00"),
                                                                         include_stop_str_in_output=True))])[0]
    assert kept.text == text[: text.index(stop) + len(stop)] and kept.finish_reason == "stop"  # (vLLM's option)
    short = engine.generate([Request(PROMPTS[5], "task-4", SamplingParams(max_tokens=3))])[0]
    assert short.token_ids == full.token_ids[:3] and short.finish_reason == "length"


def test_limits(engine):
    with pytest.raises(PromptTooLong):
        engine.submit(Request("book " * 200))
    with pytest.raises(PromptTooLong):
        engine.submit(Request(""))
    long = list(range(5, 5 + 200))  # over the limit, unless truncated (vLLM's truncate_prompt_tokens)
    last = engine.generate([Request(long, "task-1", SamplingParams(max_tokens=4, truncate_prompt_tokens=7))])[0]
    assert last.prompt_tokens == 7
    assert last.token_ids == engine.generate([Request(long[-7:], "task-1", SamplingParams(max_tokens=4))])[0].token_ids
    most = engine.generate([Request(long, None, SamplingParams(max_tokens=1, truncate_prompt_tokens=-1))])[0]
    assert most.prompt_tokens == engine.max_len - 1
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)
    near = engine.generate([Request(list(range(5, 5 + 120)), None, SamplingParams(max_tokens=50))])[0]
    assert near.finish_reason == "length" and 120 + len(near.token_ids) <= engine.max_len
    small = Engine(engine.model, engine.tokenizer, engine.pool, max_running=1, max_waiting=2, max_len=64)
    small.submit(Request("yes"))
    small.submit(Request("no"))
    with pytest.raises(QueueFull):
        small.submit(Request("maybe"))
    drain(small)
    assert small.scheduler.can_accept()


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_other_families_match_hf(tiny_llama, tmp_path, kind):
    """Qwen2 (q/k/v bias, tied embeddings) and Mistral, base rows and one adapter, exact greedy tokens."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
        with torch.no_grad():
            for layer in model.model.layers:  # random biases so that a missing one shows
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=200, tie_word_embeddings=False, **common))
    folder = tmp_path / kind
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    make_adapter(folder, tmp_path / "ad" / "a", r=4, alpha=8, seed=5)
    eng = Engine.from_pretrained(folder, adapter_root=tmp_path / "ad", max_rank=4, max_running=4, max_len=512)
    eng.pool.register_root()
    assert eng.max_len == (200 if kind == "mistral" else 256)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder).eval(), tmp_path / "ad" / "a")
    reqs = [Request(p, a, SamplingParams(max_tokens=7)) for p in PROMPTS[:3] for a in (None, "a")]
    for r, c in zip(reqs, eng.generate(reqs)):
        ids = torch.tensor([tok.encode(r.prompt)])
        with torch.no_grad():
            if r.adapter is None:
                with peft.disable_adapter():
                    out = peft.generate(input_ids=ids, max_new_tokens=7, do_sample=False, pad_token_id=tok.pad_token_id)
            else:
                out = peft.generate(input_ids=ids, max_new_tokens=7, do_sample=False, pad_token_id=tok.pad_token_id)
        assert c.token_ids == out[0, ids.shape[1]:].tolist(), (kind, r.prompt, r.adapter)
