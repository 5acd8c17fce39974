"""The HTTP API through Starlette's TestClient: OpenAI shapes, streaming, errors, metrics."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from tasktune.serve.api import create_app
from tasktune.serve.engine import Engine, Request
from tasktune.serve.sampling import SamplingParams

KEY = {"Authorization": "Bearer secret"}


def echo_predictor(task: str, inputs: dict):
    if task != "echo":
        raise LookupError(f"unknown task {task!r}")
    if "text" not in inputs:
        raise ValueError("needs 'text'")
    return inputs["text"], lambda out: (out.strip().upper(), bool(out.strip()))


@pytest.fixture(scope="module")
def engine(tiny_llama, adapter_root) -> Engine:  # noqa: F811
    eng = Engine.from_pretrained(tiny_llama, adapter_root=adapter_root, max_resident=4, max_rank=8,
                                 max_running=8, max_waiting=4, max_len=128)
    eng.pool.register_root()
    return eng


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
    for bad in ({**ok, "temperature": -1}, {**ok, "max_tokens": 0}, {**ok, "top_p": 0}, {"prompt": "hi"},
                {**ok, "stop": [""]}, {**ok, "prompt": []}, {**ok, "n": 2}):
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
    assert client.post("/v1/tasks/nope/predict", json={"inputs": {}}, headers=KEY).status_code == 404
    assert client.post("/v1/tasks/echo/predict", json={"inputs": {"x": "y"}}, headers=KEY).status_code == 422


def test_task_predict_with_the_task_registry(engine):
    with TestClient(create_app(engine)) as c:
        r = c.post("/v1/tasks/snips_intent/predict", json={"inputs": {"text": "play the beatles"}, "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["task"] == "snips_intent" and isinstance(r.json()["valid"], bool)
        assert c.post("/v1/tasks/no_such_task/predict", json={"inputs": {"text": "x"}}).status_code == 404
        assert c.post("/v1/tasks/circa/predict", json={"inputs": {"text": "x"}}).status_code == 422


def test_metrics(client):
    client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}, headers=KEY)
    text = client.get("/metrics").text
    for name in ("tasktune_requests_total", "tasktune_queue_depth", "tasktune_generation_tokens_total",
                 "tasktune_request_latency_seconds_bucket", "tasktune_running_sequences"):
        assert name in text, name
    assert 'endpoint="/v1/completions",status="200"' in text
