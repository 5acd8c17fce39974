"""vLLM's own routes beside the OpenAI ones: dynamic LoRA loading (/v1/load_lora_adapter,
/v1/unload_lora_adapter, with vLLM's bodies and plain-text answers), /version, /tokenize and
/detokenize, and vLLM's sampling options include_stop_str_in_output and truncate_prompt_tokens."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

import tasktune
from tasktune.serve.api import create_app


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, api_key="k")) as c:
        yield c


KEY = {"Authorization": "Bearer k"}


def test_load_and_unload_lora_adapter_as_vllm_does(client):
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "copy-3", "lora_path": "task-3"}, headers=KEY)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'copy-3' added successfully."
    assert "copy-3" in {m["id"] for m in client.get("/v1/models", headers=KEY).json()["data"]}
    body = {"prompt": "book a table for two", "max_tokens": 6, "temperature": 0}
    same = [client.post("/v1/completions", json={**body, "model": m}, headers=KEY).json()["choices"][0]["text"]
            for m in ("copy-3", "task-3")]
    assert same[0] == same[1]  # the same folder under another name answers the same
    again = client.post("/v1/load_lora_adapter", json={"lora_name": "copy-3", "lora_path": "task-3"}, headers=KEY)
    assert again.status_code == 409 and "already registered" in again.json()["error"]["message"]
    outside = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "../x"}, headers=KEY)
    assert outside.status_code == 400
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "a/b", "lora_path": "task-3"},
                       headers=KEY).status_code == 422
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "copy-3", "lora_int_id": 7}, headers=KEY)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'copy-3' removed successfully."
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "copy-3"}, headers=KEY).status_code == 404
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "task-3"}).status_code == 401


def test_version(client):
    assert client.get("/version").json() == {"version": tasktune.__version__}


def test_include_stop_str_in_output(client):
    """vLLM's sampling option: the stop string that ended the text stays in it, streamed too."""
    body = {"model": "task-2", "prompt": "play some jazz", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    text = client.post("/v1/completions", json=body, headers=KEY).json()["choices"][0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), text
    for include, want in ((False, text[:text.index(stop)]), (True, text[:text.index(stop) + len(stop)])):
        asked = {**body, "stop": [stop], "include_stop_str_in_output": include}
        choice = client.post("/v1/completions", json=asked, headers=KEY).json()["choices"][0]
        assert choice["text"] == want and choice["finish_reason"] == "stop"
        lines = client.post("/v1/completions", json={**asked, "stream": True}, headers=KEY).text.split("\n")
        chunks = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == want


def test_truncate_prompt_tokens(client, engine):
    """vLLM's option: only the prompt's last k tokens (-1: as many as the server takes)."""
    prompt = "book a table for two at eight tonight please"
    ids = engine.tokenizer.encode(prompt)
    body = {"model": "task-1", "prompt": prompt, "max_tokens": 4, "temperature": 0, "truncate_prompt_tokens": 3}
    out = client.post("/v1/completions", json=body, headers=KEY).json()
    plain = client.post("/v1/completions", json={**body, "prompt": ids[-3:], "truncate_prompt_tokens": None},
                        headers=KEY).json()
    assert out["usage"]["prompt_tokens"] == 3 and out["choices"][0]["text"] == plain["choices"][0]["text"]
    long = {**body, "prompt": ids * 40, "truncate_prompt_tokens": -1}
    assert client.post("/v1/completions", json={**long, "truncate_prompt_tokens": None}, headers=KEY).status_code == 400
    assert client.post("/v1/completions", json=long, headers=KEY).json()["usage"]["prompt_tokens"] == engine.max_len - 1
    r = client.post("/v1/completions", json={**body, "truncate_prompt_tokens": 0}, headers=KEY)
    assert r.status_code == 422 and "truncate_prompt_tokens" in r.text
    r = client.post("/v1/completions", json={**body, "echo": True}, headers=KEY)
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]
    chat = {"model": "task-1", "messages": [{"role": "user", "content": prompt}], "max_tokens": 2, "truncate_prompt_tokens": 2}
    assert client.post("/v1/chat/completions", json=chat, headers=KEY).json()["usage"]["prompt_tokens"] == 2


def test_tokenize_detokenize_and_model_lengths(client, engine):
    """vLLM's /tokenize and /detokenize round-trip through the engine's tokenizer; model
    cards carry max_model_len."""
    out = client.post("/tokenize", json={"model": "task-1", "prompt": "turn on the lights"}, headers=KEY).json()
    ids = engine.tokenizer.encode("turn on the lights")
    assert out == {"tokens": ids, "count": len(ids), "max_model_len": engine.max_len}
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, headers=KEY).json()
    assert chat["tokens"] == engine.tokenizer.encode("user: hi\nassistant:")
    back = client.post("/detokenize", json={"tokens": ids}, headers=KEY).json()
    assert back["prompt"] == engine.tokenizer.decode(ids)
    for url, body, status in (("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400),
                              ("/tokenize", {}, 400), ("/tokenize", {"model": "nope", "prompt": "a"}, 404),
                              ("/detokenize", {"tokens": [10**6]}, 400), ("/detokenize", {"tokens": []}, 422)):
        bad = client.post(url, json=body, headers=KEY)
        assert bad.status_code == status, (url, body, bad.text)
    assert client.post("/tokenize", json={"prompt": "a"}).status_code == 401  # behind the API key too
    cards = client.get("/v1/models", headers=KEY).json()["data"]
    assert all(c["max_model_len"] == engine.max_len for c in cards)
