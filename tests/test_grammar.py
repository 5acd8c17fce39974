"""Decoding bound to a JSON schema, any JSON object or a regex (serve/grammar.py, xgrammar),
against a greedy loop over Hugging Face + PEFT logits masked by the same grammar."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tasktune.serve.engine import Request
from tasktune.serve.grammar import GrammarError, mask_rows, matcher
from tasktune.serve.sampling import SamplingParams

xgr = pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"intent": {"type": "string", "enum": ["play_music", "book_table", "weather"]},
                                           "people": {"type": "integer"}},
          "required": ["intent", "people"]}


@pytest.mark.parametrize("adapter", [None, "task-4"])
def test_guided_json_equals_a_masked_greedy_loop_over_hf_logits(engine, tiny_llama, adapter_root, adapter):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_root / "task-4", adapter_name="task-4")
    grammar = engine.grammars.json_schema(SCHEMA)
    prompt = "book a table for two"
    c = engine.generate([Request(prompt, adapter, SamplingParams(max_tokens=40, grammar=grammar))])[0]
    ids, want, m = engine.tokenizer.encode(prompt), [], matcher(grammar)
    for _ in range(40):
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter():
                    logits = model(input_ids=torch.tensor([ids + want])).logits[0, -1:].float()
            else:
                logits = model(input_ids=torch.tensor([ids + want])).logits[0, -1:].float()
        t = int(mask_rows(logits, [m]).argmax())
        m.accept_token(t)
        if t in engine.eos_ids:
            break
        want.append(t)
    assert c.token_ids[:len(want)] == want
    if c.finish_reason == "stop":  # a whole match: the schema's JSON, on one line as json.dumps writes it
        value = json.loads(c.text)
        assert set(value) == {"intent", "people"} and value["intent"] in SCHEMA["properties"]["intent"]["enum"]
        assert isinstance(value["people"], int) and c.text == json.dumps(value)


def test_sampled_rows_always_match_their_grammar(engine):
    """Sampled at temperature 1, beside unbound rows: every request that ends by itself ends on a
    whole match of its own grammar (JSON schema, any JSON object, regex). Where the engine
    draws on the device (the interpreter here, a GPU), no step launched ahead is discarded and
    a seeded request's tokens are those it draws alone."""
    g = engine.grammars
    cases = [(g.json_schema(SCHEMA), lambda t: set(json.loads(t)) == {"intent", "people"}),
             (g.json_object(), lambda t: isinstance(json.loads(t), dict)),
             (g.regex(r"(yes|no), [0-9]{1,3} times"), lambda t: re.fullmatch(r"(yes|no), [0-9]{1,3} times", t))]
    reqs = []
    for seed in range(4):
        for grammar, _ in cases:
            reqs.append(Request("is it raining", f"task-{seed}", SamplingParams(max_tokens=60, temperature=1.0,
                                                                               seed=seed, grammar=grammar)))
        reqs.append(Request("play some jazz", None, SamplingParams(max_tokens=8, temperature=1.0, seed=seed)))
    step = engine.decode_step
    wasted = step.ahead_wasted
    out = engine.generate(reqs)
    if engine._can_draw:  # drawn on the device from the masked rows, steps launched ahead: none discarded,
        assert step.ahead_wasted == wasted  # and a seeded request draws the same tokens alone
        assert engine.generate([reqs[1]])[0].token_ids == out[1].token_ids
        penalized = Request("play some jazz", None, SamplingParams(max_tokens=8, repetition_penalty=1.2))
        assert engine.generate([penalized, reqs[1]])[1].token_ids == out[1].token_ids  # (the logits path)
    seeds = [Request("is it raining", "task-1", SamplingParams(max_tokens=20, temperature=1.0, seed=s,
                                                               grammar=cases[1][0])) for s in range(4)]
    assert len({tuple(c.token_ids) for c in engine.generate(seeds)}) > 1  # (drawn, not the argmax)
    ended = 0
    for i, c in enumerate(out):
        if i % 4 == 3 or c.finish_reason != "stop":
            continue
        ended += 1
        assert cases[i % 4][1](c.text), (i, c.text)
    assert ended >= 4  # the regex is short: those always end


def test_greedy_grammar_rows_on_the_device_path_equal_the_logits_path(engine, monkeypatch):
    """Greedy rows bound to grammars decode with steps launched ahead (their masks filled when
    the step is taken) beside plain greedy rows, one asking for log-probabilities, rows ending
    on different steps and arrivals taking their slots: no step launched ahead is discarded,
    and tokens and log-probabilities equal those of the logits path."""
    from tasktune.serve import engine as engine_module

    g = engine.grammars
    grammars = [g.json_schema(SCHEMA), g.regex(r"(yes|no), [0-9]{1,3} times"), g.json_object()]
    reqs = [Request(prompt, f"task-{i % 5}" if i % 3 else None,
                    SamplingParams(max_tokens=8 + 5 * i, grammar=grammars[i % 3] if i % 4 != 3 else None,
                                   logprobs=2 if i == 5 else None))
            for i, prompt in enumerate(["book a table for two", "is it raining", "play jazz", "weather in paris",
                                        "wake me at six", "is it sunny", "add milk", "set a timer"])]
    step = engine.decode_step
    used, wasted = step.ahead_used, step.ahead_wasted
    on = engine.generate(reqs)
    # every decode step was one launched ahead: arrivals (their first token masked on the device) joined it
    assert step.ahead_used - used >= 20 and step.ahead_wasted == wasted
    monkeypatch.setattr(engine_module, "GRAMMAR_AHEAD", False)
    off = engine.generate(reqs)
    assert [c.token_ids for c in on] == [c.token_ids for c in off]
    assert [c.finish_reason for c in on] == [c.finish_reason for c in off]
    assert on[5].logprobs == off[5].logprobs and len(on[5].logprobs) == len(on[5].token_ids)
    assert on[1].finish_reason != "stop" or re.fullmatch(r"(yes|no), [0-9]{1,3} times", on[1].text)


def test_bad_grammars_name_the_problem(engine):
    with pytest.raises(GrammarError, match="invalid JSON schema"):
        engine.grammars.json_schema("{not json")
    with pytest.raises(GrammarError, match="invalid regular expression"):
        engine.grammars.regex("a[")
    with pytest.raises(ValueError, match="cannot be combined with choices, min_tokens or ignore_eos"):
        SamplingParams(grammar=engine.grammars.json_object(), min_tokens=2)
    assert engine.grammars.json_schema(SCHEMA) is engine.grammars.json_schema(json.dumps(SCHEMA))  # compiled once


def test_properties_come_in_the_schema_order(engine):
    """As the schema declares them (not sorted): a model trained on {"zeta": .., "alpha": ..}
    must be able to write exactly that."""
    schema = {"type": "object", "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}},
              "required": ["zeta", "alpha"]}
    c = engine.generate([Request("is it raining", None, SamplingParams(
        max_tokens=30, grammar=engine.grammars.json_schema(schema)))])[0]
    assert c.text.startswith('{"zeta": ')
    if c.finish_reason == "stop":
        assert list(json.loads(c.text)) == ["zeta", "alpha"]


@pytest.fixture(scope="module")
def client(engine):
    pytest.importorskip("fastapi")  # (the GPU image has none: the API tests run in CI)
    from fastapi.testclient import TestClient

    from tasktune.serve.api import create_app

    with TestClient(create_app(engine)) as c:
        yield c


def test_api_guided_json_regex_and_response_format(client, engine):
    """The API's ways (vLLM's guided_json, guided_regex and guided_grammar, OpenAI's response_format)
    give what the engine gives for the same grammar; chat and completions both take them."""
    body = {"model": "task-2", "prompt": "book a table for two", "max_tokens": 40, "temperature": 0}
    want = engine.generate([Request(body["prompt"], "task-2", SamplingParams(
        max_tokens=40, grammar=engine.grammars.json_schema(SCHEMA)))])[0].text
    got = client.post("/v1/completions", json={**body, "guided_json": SCHEMA})
    assert got.status_code == 200, got.text
    assert got.json()["choices"][0]["text"] == want
    as_format = {"type": "json_schema", "json_schema": {"name": "booking", "schema": SCHEMA, "strict": True}}
    assert client.post("/v1/completions", json={**body, "response_format": as_format}).json()["choices"][0]["text"] == want
    regex = client.post("/v1/completions", json={**body, "guided_regex": "(yes|no)!", "max_tokens": 8}).json()
    assert regex["choices"][0]["text"] in ("yes!", "no!") and regex["choices"][0]["finish_reason"] == "stop"
    ebnf = client.post("/v1/completions", json={**body, "guided_grammar": 'root ::= ("yes" | "no") ", " [0-9] [0-9]?',
                                                "max_tokens": 8}).json()
    assert re.fullmatch(r"(yes|no), [0-9]{1,2}", ebnf["choices"][0]["text"]), ebnf
    chat = client.post("/v1/chat/completions", json={
        "model": "task-2", "messages": [{"role": "user", "content": "weather?"}], "max_tokens": 60, "temperature": 0,
        "response_format": {"type": "json_object"}})
    assert chat.status_code == 200, chat.text
    text = chat.json()["choices"][0]["message"]["content"]
    if chat.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


@pytest.mark.parametrize("extra, message", [
    ({"guided_json": "{not json"}, "guided_json: invalid JSON schema"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "guided_json: invalid JSON schema"),
    ({"guided_regex": "a["}, "guided_regex: invalid regular expression"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar: invalid EBNF grammar"),
    ({"guided_regex": "a", "guided_choice": ["x"]}, "give one of guided_choice and guided_regex, not both"),
    ({"guided_json": {}, "response_format": {"type": "json_object"}}, "give one of guided_json and response_format"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "a grammar cannot be combined with"),
])
def test_api_refuses_bad_grammars_by_name(client, extra, message):
    r = client.post("/v1/completions", json={"model": "task-2", "prompt": "hi", "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_grammar_rows_on_the_gpu_beside_graph_decoding(tiny_llama, adapter_root, monkeypatch):
    """bf16 on a GPU: grammar-bound rows (masked on the device) beside plain greedy rows
    decoding from CUDA graphs; the plain rows' tokens are those they get alone, every bound
    row that ends matches its grammar, and the greedy ones (steps launched ahead, masks filled
    while they run) give the tokens of the logits path."""
    from tasktune.serve import engine as engine_module
    from tasktune.serve.engine import Engine

    eng = Engine.from_pretrained(tiny_llama, adapter_root=adapter_root, max_resident=4, max_rank=8,
                                 max_running=8, max_len=128, device="cuda", dtype=torch.bfloat16)
    eng.pool.register_root()
    plain = [Request("book a table", "task-1", SamplingParams(max_tokens=12)),
             Request("play the beatles", None, SamplingParams(max_tokens=12))]
    alone = eng.generate(plain)
    bound = [Request("is it raining", f"task-{i}", SamplingParams(max_tokens=60, temperature=t, seed=i, grammar=g))
             for i, (g, t) in enumerate([(eng.grammars.json_schema(SCHEMA), 0.0), (eng.grammars.json_schema(SCHEMA), 1.0),
                                         (eng.grammars.regex(r"(yes|no), [0-9]{1,3} times"), 1.0)])]
    out = eng.generate([plain[0], *bound, plain[1]])
    assert [c.token_ids for c in alone] == [out[0].token_ids, out[-1].token_ids]
    for c in out[1:3]:
        if c.finish_reason == "stop":
            assert set(json.loads(c.text)) == {"intent", "people"}
        else:
            assert c.text.startswith('{"intent": "')
    assert out[3].finish_reason == "stop" and re.fullmatch(r"(yes|no), [0-9]{1,3} times", out[3].text)
    monkeypatch.setattr(engine_module, "GRAMMAR_AHEAD", False)
    logits_path = eng.generate([plain[0], *bound, plain[1]])
    assert [c.token_ids for c in logits_path[:2]] == [c.token_ids for c in out[:2]]
