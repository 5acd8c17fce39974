"""`tasktune serve RUN_DIR`: a trained run's adapters behind the OpenAI-compatible API,
answering exactly like the trained model (greedy tokens equal HF + the runner)."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from projects import tiny_config
from tasktune.errors import TasktuneError
from tasktune.lora.inject import use_adapters
from tasktune.serve.launch import build_server
from tasktune.train.run import train_strategy


def test_serve_a_run_folder(tmp_path, tiny_llama):
    cfg = tiny_config(tmp_path, tiny_llama, max_steps=3)
    runner, _, _ = train_strategy(cfg, "single", tmp_path / "run", progress=False)
    app, names = build_server([tmp_path / "run"], None)
    assert names == ["home_intent", "snips_slots"]
    prompt = "turn on the kitchen lights"
    with TestClient(app) as client:
        models = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert {"home_intent", "snips_slots"} <= models
        reply = client.post("/v1/completions", json={"model": "home_intent", "prompt": prompt, "max_tokens": 5, "temperature": 0})
        assert reply.status_code == 200, reply.text
        served = reply.json()["choices"][0]["text"]
        assert client.post("/v1/completions", json={"model": "nope", "prompt": prompt}).status_code == 404
    # the same greedy continuation from the trained runner through Hugging Face generate
    tok = runner.tokenizer
    ids = tok(prompt, return_tensors="pt").input_ids
    runner.eval()
    with torch.no_grad(), use_adapters(runner.handle, torch.tensor([runner.handle.index("home_intent")])):
        out = runner.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert served.strip() == expected.strip()


def test_serve_rejects_a_folder_that_is_neither(tmp_path):
    with pytest.raises(TasktuneError, match="neither a PEFT adapter folder"):
        build_server([tmp_path], "minilm")
