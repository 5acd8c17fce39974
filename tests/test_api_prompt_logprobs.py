"""vLLM's `prompt_logprobs` through the HTTP API: each prompt token's log-probability, its
rank over the vocabulary and its most likely alternatives, keyed by token id, for
completions (per choice) and chat (on the response), beside OpenAI's echo + logprobs."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tasktune.serve.api import create_app, render_chat
from tasktune.serve.engine import Engine, Request
from tasktune.serve.sampling import SamplingParams
from tasktune.serve.schemas import ChatMessage

from tiny_models import tiny_engine

PROMPT = "remind me to call my sister at noon"


@pytest.fixture(scope="module")
def engine(tiny_llama, adapter_root) -> Engine:
    return tiny_engine(tiny_llama, adapter_root, max_running=8, max_waiting=8, max_len=128)


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine)) as c:
        yield c


def scored(engine: Engine, prompt: str, adapter: str | None, k: int):
    return engine.generate([Request(prompt, adapter, SamplingParams(max_tokens=0, prompt_logprobs=k))])[0]


def check_entries(entries, ids, ref, k, text_of):
    """vLLM's shape: None first, then {token id: {logprob, rank, decoded_token}} holding the
    prompt token (its own rank) and the k most likely tokens (ranks 1..k)."""
    assert entries[0] is None and len(entries) == len(ids)
    for t in range(1, len(ids)):
        entry, lp = entries[t], ref.prompt_logprobs[t]
        own = entry[str(ids[t])]
        assert own["logprob"] == pytest.approx(lp.logprob) and own["rank"] == lp.rank >= 1
        assert own["decoded_token"] == text_of(ids[t])
        for j, (i, v) in enumerate(lp.top):
            alt = entry[str(i)]
            assert alt["logprob"] == pytest.approx(v) and alt["decoded_token"] == text_of(i)
            assert alt["rank"] == (lp.rank if i == ids[t] else j + 1)
        assert set(entry) == {str(ids[t])} | {str(i) for i, _ in lp.top[:k]}


def test_completions_return_prompt_logprobs_per_choice(client, engine):
    text_of = lambda i: engine.tokenizer.decode([i])  # noqa: E731
    ids = engine.tokenizer.encode(PROMPT)
    body = {"model": "task-2", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "prompt_logprobs": 2, "n": 2}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    ref = scored(engine, PROMPT, "task-2", 2)
    plain = engine.generate([Request(PROMPT, "task-2", SamplingParams(max_tokens=3))])[0]
    for choice in r.json()["choices"]:
        check_entries(choice["prompt_logprobs"], ids, ref, 2, text_of)
        assert choice["text"] == plain.text  # scoring the prompt does not change the answer
    assert client.post("/v1/completions", json={**body, "prompt_logprobs": None}).json()["choices"][0][
        "prompt_logprobs"] is None


def test_prompt_logprobs_beside_echo_with_fewer_alternatives(client, engine):
    """echo + logprobs 1 keeps one alternative a token while prompt_logprobs asks for 3."""
    body = {"model": "task-1", "prompt": PROMPT, "max_tokens": 0, "temperature": 0, "logprobs": 1, "echo": True,
            "prompt_logprobs": 3}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    ref = scored(engine, PROMPT, "task-1", 3)
    assert all(len(d) == 1 for d in choice["logprobs"]["top_logprobs"][1:])
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx([lp.logprob for lp in ref.prompt_logprobs[1:]])
    check_entries(choice["prompt_logprobs"], engine.tokenizer.encode(PROMPT), ref, 3,
                  lambda i: engine.tokenizer.decode([i]))


def test_chat_returns_the_templated_prompts_logprobs(client, engine):
    msgs = [{"role": "user", "content": "is it raining"}]
    r = client.post("/v1/chat/completions", json={"model": "task-0", "messages": msgs, "max_tokens": 2,
                                                  "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    prompt = render_chat(engine.tokenizer, [ChatMessage(**m) for m in msgs])
    ref = scored(engine, prompt, "task-0", 0)
    check_entries(r.json()["prompt_logprobs"], engine.tokenizer.encode(prompt), ref, 0,
                  lambda i: engine.tokenizer.decode([i]))


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
def test_prompt_logprobs_bounds_and_no_stream(client, path, body):
    body = {"model": "task-0", **body}
    r = client.post(path, json={**body, "prompt_logprobs": 1, "stream": True})
    assert r.status_code == 400 and "prompt_logprobs" in r.json()["error"]["message"]
    r = client.post(path, json={**body, "prompt_logprobs": 21})
    assert r.status_code == 422 and "prompt_logprobs" in r.text
