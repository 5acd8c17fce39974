"""The HTTP API through Starlette's TestClient: OpenAI shapes, streaming, errors, metrics."""

from __future__ import annotations

import json
import math
import time

import pytest
from fastapi.testclient import TestClient

from tasktune.serve.api import create_app
from tasktune.serve.engine import Engine, Request
from tasktune.serve.sampling import SamplingParams
from tasktune.serve.task_predictor import TaskQuery

from tiny_models import tiny_engine

KEY = {"Authorization": "Bearer secret"}


def echo_predictor(task: str, inputs: dict):
    if task != "echo":
        raise LookupError(f"unknown task {task!r}")
    if "text" not in inputs:
        raise ValueError("needs 'text'")
    return TaskQuery(inputs["text"], lambda out: (out.strip().upper(), bool(out.strip())))


@pytest.fixture(scope="module")
def engine(tiny_llama, adapter_root) -> Engine:
    return tiny_engine(tiny_llama, adapter_root, max_running=8, max_waiting=4, max_len=128)


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, api_key="secret", tasks=echo_predictor)) as c:
        yield c


def direct(engine: Engine, prompt: str, adapter: str | None, n: int) -> str:
    return engine.generate([Request(prompt, adapter, SamplingParams(max_tokens=n))])[0].text


def sse(response) -> list:
    lines = [ln for ln in response.text.split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def test_completions_match_the_engine(client, engine):
    body = {"model": "task-1", "prompt": "play the beatles", "max_tokens": 6, "temperature": 0}
    r = client.post("/v1/completions", json=body, headers=KEY)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == "task-1"
    assert out["choices"][0]["text"] == direct(engine, "play the beatles", "task-1", 6)
    assert out["usage"]["completion_tokens"] <= 6
    two = client.post("/v1/completions", json={**body, "prompt": ["yes", "no"], "model": "tiny-llama"}, headers=KEY)
    assert [c["text"] for c in two.json()["choices"]] == [direct(engine, p, None, 6) for p in ("yes", "no")]


def test_streaming_completions(client):
    body = {"model": "task-3", "prompt": "what is the weather", "max_tokens": 10, "temperature": 0}
    full = client.post("/v1/completions", json=body, headers=KEY).json()["choices"][0]
    r = client.post("/v1/completions", json={**body, "stream": True}, headers=KEY)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["finish_reason"]


def test_chat_and_chat_streaming(client, engine):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "book a table"}]
    body = {"model": "task-2", "messages": msgs, "max_tokens": 7, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body, headers=KEY)
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert msg["role"] == "assistant"
    assert msg["content"] == direct(engine, "system: be brief\nuser: book a table\nassistant:", "task-2", 7)
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}, headers=KEY))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == msg["content"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_models_and_unknown_model(client):
    ids = [m["id"] for m in client.get("/v1/models", headers=KEY).json()["data"]]
    assert ids[0] == "tiny-llama" and {f"task-{i}" for i in range(8)} <= set(ids)
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "hi"}, headers=KEY)
    assert r.status_code == 404 and "not found" in r.json()["error"]["message"]
    assert client.get("/v1/nothing-here", headers=KEY).status_code == 404


def test_api_key(client):
    body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 1}
    assert client.post("/v1/completions", json=body).status_code == 401
    r = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/models", headers={"Authorization": "Bearer ☃".encode()}).status_code == 401
    assert client.get("/health").json()["status"] == "ok"


def test_bad_bodies(client):
    url, ok = "/v1/completions", {"model": "tiny-llama", "prompt": "hi"}
    for bad in ({**ok, "temperature": -1}, {**ok, "max_tokens": -1}, {**ok, "top_p": 0}, {"prompt": "hi"},
                {**ok, "stop": [""]}, {**ok, "prompt": []}, {**ok, "n": 17}, {**ok, "n": 0}):
        r = client.post(url, json=bad, headers=KEY)
        assert r.status_code == 422 and r.json()["error"]["message"].startswith("invalid request"), bad
    r = client.post(url, content=b"{not json", headers={**KEY, "content-type": "application/json"})
    assert r.status_code == 422
    r = client.post(url, json={**ok, "prompt": "book " * 300}, headers=KEY)
    assert r.status_code == 400 and "limit" in r.json()["error"]["message"]
    assert client.post(url, json={**ok, "prompt": ""}, headers=KEY).status_code == 400


def test_queue_full_gives_429(client, engine):
    runner = client.app.state.runner
    runner.pause()
    try:
        seqs = [engine.submit(Request("yes", None, SamplingParams(max_tokens=2))) for _ in range(4)]
        r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hi"}, headers=KEY)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        runner.resume()
    deadline = time.monotonic() + 30
    while not all(s.finished for s in seqs) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(s.finish_reason == "length" for s in seqs)


def test_adapter_load_and_unload(client, engine):
    r = client.post("/v1/adapters", json={"name": "copy-2", "path": "task-2"}, headers=KEY)
    assert r.status_code == 201 and r.json()["rank"] == 8
    body = {"prompt": "rate this book", "max_tokens": 5, "temperature": 0}
    a = client.post("/v1/completions", json={**body, "model": "copy-2"}, headers=KEY).json()
    b = client.post("/v1/completions", json={**body, "model": "task-2"}, headers=KEY).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert client.post("/v1/adapters", json={"name": "copy-2", "path": "task-2"}, headers=KEY).status_code == 409
    assert client.post("/v1/adapters", json={"name": "x", "path": "../etc"}, headers=KEY).status_code == 400
    assert client.post("/v1/adapters", json={"name": "x", "path": "/etc"}, headers=KEY).status_code == 400
    assert client.post("/v1/adapters", json={"name": "a/b", "path": "task-2"}, headers=KEY).status_code == 422
    assert "copy-2" in [m["id"] for m in client.get("/v1/models", headers=KEY).json()["data"]]
    assert client.delete("/v1/adapters/copy-2", headers=KEY).status_code == 200
    assert client.delete("/v1/adapters/copy-2", headers=KEY).status_code == 404
    assert client.post("/v1/completions", json={**body, "model": "copy-2"}, headers=KEY).status_code == 404


def test_task_predict(client, engine, tiny_llama):
    r = client.post("/v1/tasks/echo/predict", json={"inputs": {"text": "play music"}, "max_tokens": 4}, headers=KEY)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "tiny-llama" and out["text"] == direct(engine, "play music", None, 4)
    assert out["prediction"] == out["text"].strip().upper()
    ref = engine.generate([Request("play music", None, SamplingParams(max_tokens=4, logprobs=0))])[0]
    assert out["score"] == pytest.approx(math.exp(sum(lp.logprob for lp in ref.logprobs)))  # the answer's probability
    assert 0 < out["score"] <= 1
    assert client.post("/v1/tasks/nope/predict", json={"inputs": {}}, headers=KEY).status_code == 404
    assert client.post("/v1/tasks/echo/predict", json={"inputs": {"x": "y"}}, headers=KEY).status_code == 422


def test_task_predict_with_the_task_registry(engine):
    with TestClient(create_app(engine)) as c:
        r = c.post("/v1/tasks/snips_intent/predict", json={"inputs": {"text": "play the beatles"}, "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["task"] == "snips_intent" and isinstance(r.json()["valid"], bool)
        assert c.post("/v1/tasks/no_such_task/predict", json={"inputs": {"text": "x"}}).status_code == 404
        assert [c.post("/v1/tasks/circa/predict", json={"inputs": x}).status_code for x in ({"text": "x"}, "x")] == [422] * 2


def test_metrics(client):
    client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}, headers=KEY)
    text = client.get("/metrics").text
    for name in ("tasktune_requests_total", "tasktune_queue_depth", "tasktune_generation_tokens_total",
                 "tasktune_request_latency_seconds_bucket", "tasktune_running_sequences"):
        assert name in text, name
    assert 'endpoint="/v1/completions",status="200"' in text


def test_completion_logprobs_match_the_engine_and_stream(client, engine):
    body = {"model": "task-4", "prompt": "find a flight to boston", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    r = client.post("/v1/completions", json=body, headers=KEY)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ref = engine.generate([Request(body["prompt"], "task-4", SamplingParams(max_tokens=6, logprobs=2))])[0]
    lp = choice["logprobs"]
    assert lp["token_logprobs"] == pytest.approx([x.logprob for x in ref.logprobs])
    assert lp["tokens"] == [engine.tokenizer.decode([t]) for t in ref.token_ids]
    # (a dict by token text: two ids with one text, e.g. two halves of a UTF-8 character, share a key)
    assert all(any(v == pytest.approx(w) for _, w in x.top)
               for d, x in zip(lp["top_logprobs"], ref.logprobs) for v in d.values())
    assert all(1 <= len(d) <= 2 for d in lp["top_logprobs"])
    assert all(max(d.values()) >= v - 1e-6 for d, v in zip(lp["top_logprobs"], lp["token_logprobs"]))  # greedy: the top one
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    if choice["finish_reason"] == "length":
        assert "".join(lp["tokens"]) == choice["text"]
    chunks = sse(client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}},
                             headers=KEY))
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"]]
    assert sum((x["token_logprobs"] for x in streamed), []) == pytest.approx(lp["token_logprobs"])
    assert sum((x["text_offset"] for x in streamed), []) == lp["text_offset"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(ref.token_ids)
    zero = client.post("/v1/completions", json={**body, "logprobs": 0}, headers=KEY).json()["choices"][0]["logprobs"]
    assert zero["top_logprobs"] is None and zero["token_logprobs"] == pytest.approx(lp["token_logprobs"])
    plain = client.post("/v1/completions", json={**body, "logprobs": None}, headers=KEY).json()["choices"][0]
    assert plain["logprobs"] is None and plain["text"] == choice["text"]
    echoed = client.post("/v1/completions", json={**body, "logprobs": None, "echo": True}, headers=KEY).json()
    assert echoed["choices"][0]["text"] == body["prompt"] + choice["text"]


def test_echo_with_logprobs_scores_the_prompt(client, engine):
    """OpenAI's echo + logprobs (how lm-evaluation-harness's local-completions scores a
    continuation): the prompt's tokens come first with their log-probabilities, the first
    null; max_tokens 0 generates nothing. Streamed, the first chunk carries the prompt's."""
    prompt = "set a timer for ten minutes"
    body = {"model": "task-3", "prompt": prompt, "max_tokens": 0, "temperature": 0, "logprobs": 1, "echo": True}
    r = client.post("/v1/completions", json=body, headers=KEY)
    assert r.status_code == 200, r.text
    out = r.json()
    choice, ids = out["choices"][0], engine.tokenizer.encode(prompt)
    ref = engine.generate([Request(prompt, "task-3", SamplingParams(max_tokens=0, prompt_logprobs=1))])[0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert lp["tokens"] == [engine.tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([x.logprob for x in ref.prompt_logprobs[1:]])
    assert all(len(d) == 1 for d in lp["top_logprobs"][1:])
    more = client.post("/v1/completions", json={**body, "max_tokens": 3}, headers=KEY).json()["choices"][0]
    gen = engine.generate([Request(prompt, "task-3", SamplingParams(max_tokens=3, logprobs=1))])[0]
    assert more["text"] == prompt + gen.text
    assert more["logprobs"]["token_logprobs"][1:] == pytest.approx(
        lp["token_logprobs"][1:] + [x.logprob for x in gen.logprobs])
    chunks = sse(client.post("/v1/completions", json={**body, "max_tokens": 3, "stream": True}, headers=KEY))
    streamed = sum((c["choices"][0]["logprobs"]["token_logprobs"] for c in chunks), [])
    assert streamed[0] is None and streamed[1:] == pytest.approx(more["logprobs"]["token_logprobs"][1:])
    assert chunks[0]["choices"][0]["text"].startswith(prompt)


def test_chat_logprobs(client, engine):
    msgs = [{"role": "user", "content": "is it raining"}]
    body = {"model": "task-1", "messages": msgs, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    r = client.post("/v1/chat/completions", json=body, headers=KEY)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    ref = engine.generate([Request("user: is it raining\nassistant:", "task-1", SamplingParams(max_tokens=5, logprobs=3))])[0]
    assert [c["logprob"] for c in content] == pytest.approx([x.logprob for x in ref.logprobs])
    assert all(len(c["top_logprobs"]) == 3 and c["bytes"] == list(c["token"].encode()) for c in content)
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}, headers=KEY))
    streamed = sum((c["choices"][0]["logprobs"]["content"] for c in chunks), [])
    assert [c["logprob"] for c in streamed] == pytest.approx([c["logprob"] for c in content])
    no_top = client.post("/v1/chat/completions", json={**body, "top_logprobs": None}, headers=KEY).json()
    assert all(c["top_logprobs"] == [] for c in no_top["choices"][0]["logprobs"]["content"])
    assert client.post("/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None}, headers=KEY).json()[
        "choices"][0]["logprobs"] is None


def test_penalties_and_bias_through_the_api(client, engine):
    body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 3, "temperature": 0, "logit_bias": {"11": 100}}
    r = client.post("/v1/completions", json=body, headers=KEY)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == engine.tokenizer.decode([11, 11, 11]) or r.json()["choices"][0][
        "finish_reason"] == "stop"
    pen = {"model": "task-0", "prompt": "play music", "max_tokens": 8, "temperature": 0, "frequency_penalty": 1.2,
           "presence_penalty": 0.4}
    text = client.post("/v1/completions", json=pen, headers=KEY).json()["choices"][0]["text"]
    ref = engine.generate([Request("play music", "task-0", SamplingParams(max_tokens=8, frequency_penalty=1.2,
                                                                         presence_penalty=0.4))])[0]
    assert text == ref.text


def test_token_id_prompts_and_vllm_sampling_fields(client, engine):
    body = {"model": "task-2", "max_tokens": 5, "temperature": 0}
    text = client.post("/v1/completions", json={**body, "prompt": "turn on the lights"}, headers=KEY).json()
    ids = engine.tokenizer.encode("turn on the lights")
    by_ids = client.post("/v1/completions", json={**body, "prompt": ids}, headers=KEY).json()
    assert by_ids["choices"][0]["text"] == text["choices"][0]["text"]
    assert by_ids["usage"] == text["usage"]
    two = client.post("/v1/completions", json={**body, "prompt": [ids, ids[:2]], "echo": True}, headers=KEY).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["choices"][0]["text"] == engine.tokenizer.decode(ids) + text["choices"][0]["text"]
    extras = {"top_k": 1, "min_p": 0.5, "repetition_penalty": 1.3, "min_tokens": 2, "ignore_eos": True,
              "stop_token_ids": [5]}
    r = client.post("/v1/completions", json={**body, "prompt": "turn on the lights", "temperature": 1, **extras},
                    headers=KEY)
    assert r.status_code == 200, r.text
    ref = engine.generate([Request("turn on the lights", "task-2", SamplingParams(
        max_tokens=5, temperature=1, top_k=1, min_p=0.5, repetition_penalty=1.3, min_tokens=2, ignore_eos=True,
        stop_token_ids=(5,)))])[0]
    assert r.json()["choices"][0]["text"] == ref.text  # (top_k 1: the greedy token whatever the seed)
    bad = client.post("/v1/completions", json={**body, "prompt": [10**6]}, headers=KEY)
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]


def test_n_choices_and_streams_of_several_prompts(client, engine):
    """n choices a prompt (a seeded one draws choice j with seed + j), several prompts in one
    stream: each choice's chunks, by index, add up to the choice the request gets unstreamed."""
    body = {"model": "task-3", "prompt": ["turn it up", "call mom"], "max_tokens": 6, "temperature": 1.0,
            "seed": 11, "n": 3}
    r = client.post("/v1/completions", json=body, headers=KEY)  # (6 sequences; this server queues 4)
    assert r.status_code == 400 and "queues at most 4" in r.json()["error"]["message"]
    body["n"] = 2
    r = client.post("/v1/completions", json=body, headers=KEY)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == list(range(4))
    for c in out["choices"]:
        prompt, j = body["prompt"][c["index"] // 2], c["index"] % 2
        ref = engine.generate([Request(prompt, "task-3", SamplingParams(max_tokens=6, temperature=1.0, seed=11 + j))])[0]
        assert c["text"] == ref.text
    prompt_tokens = sum(len(engine.tokenizer.encode(p)) for p in body["prompt"])
    assert out["usage"]["prompt_tokens"] == prompt_tokens  # each prompt once, whatever n
    chunks = sse(client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}},
                             headers=KEY))
    texts, reasons = [""] * 4, [None] * 4
    for ch in chunks[:-1]:
        (c,) = ch["choices"]
        texts[c["index"]] += c["text"]
        reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
    assert texts == [c["text"] for c in out["choices"]]
    assert reasons == [c["finish_reason"] for c in out["choices"]]
    assert chunks[-1]["usage"] == out["usage"]
    chat = {"model": "task-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2,
            "temperature": 0.8, "seed": 5}
    full = client.post("/v1/chat/completions", json=chat, headers=KEY).json()
    assert [c["index"] for c in full["choices"]] == [0, 1]
    streamed = sse(client.post("/v1/chat/completions", json={**chat, "stream": True}, headers=KEY))
    for i in (0, 1):
        mine = [c["choices"][0] for c in streamed if c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content", "") for c in mine) == full["choices"][i]["message"]["content"]


@pytest.mark.parametrize("url, extra, status, words", [
    ("/v1/completions", {"suffix": "x"}, 422, "suffix"),
    ("/v1/completions", {"best_of": 2}, 422, "best_of"),
    ("/v1/chat/completions", {"max_tokens": 0}, 422, "max_tokens"),
    ("/v1/completions", {"logprobs": 21}, 422, "logprobs"),
    ("/v1/completions", {"logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"abc": 1}}, 422, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"1": 101}}, 422, "logit_bias"),
    ("/v1/completions", {"presence_penalty": 3}, 422, "presence_penalty"),
    ("/v1/completions", {"stop_token_ids": [99999]}, 400, "stop_token_ids"),
    ("/v1/completions", {"min_tokens": 3}, 400, "min_tokens"),
    ("/v1/completions", {"repetition_penalty": 0}, 422, "repetition_penalty"),
    ("/v1/completions", {"prompt": []}, 422, "prompt"),
    ("/v1/chat/completions", {"top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 422, "tools"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, 422, "needs json_schema"),
])
def test_unsupported_and_out_of_range_fields_are_refused_by_name(client, url, extra, status, words):
    body = {"model": "tiny-llama", "max_tokens": 2}
    body |= {"prompt": "hi"} if url == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    r = client.post(url, json={**body, **extra}, headers=KEY)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_guided_choice_and_guided_task_answers(client, engine):
    """vLLM's guided_choice: the text is one of the choices whatever the model prefers;
    /v1/tasks/{task}/predict constrains a closed-set task to its labels unless guided is false."""
    answers = ["turn on the lights", "play music", "no"]
    body = {"model": "task-2", "prompt": "hello there", "max_tokens": 24, "temperature": 0, "guided_choice": answers}
    r = client.post("/v1/completions", json=body, headers=KEY)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    decoded = {engine.tokenizer.decode(engine.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers}
    assert choice["text"] in decoded and choice["finish_reason"] == "stop"
    ids = tuple(tuple(engine.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    ref = engine.generate([Request("hello there", "task-2", SamplingParams(max_tokens=24, choices=ids))])[0]
    assert choice["text"] == ref.text
    chat = {"model": "task-2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "guided_choice": answers,
            "temperature": 1.2, "seed": 5, "n": 4}
    out = client.post("/v1/chat/completions", json=chat, headers=KEY).json()
    assert all(c["message"]["content"] in decoded for c in out["choices"])
    for extra, words in (({"min_tokens": 1}, "guided_choice"), ({"ignore_eos": True}, "guided_choice"),
                         ({"guided_choice": []}, "guided_choice"), ({"guided_choice": [""]}, "guided_choice")):
        bad = client.post("/v1/completions", json={**body, **extra}, headers=KEY)
        assert bad.status_code in (400, 422) and words in bad.json()["error"]["message"], bad.text
