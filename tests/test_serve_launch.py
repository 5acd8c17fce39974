"""`tasktune serve RUN_DIR`: a trained run's adapters behind the OpenAI-compatible API,
answering exactly like the trained model (greedy tokens equal HF + the runner)."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch
from fastapi.testclient import TestClient

from projects import tiny_config
from tasktune.errors import TasktuneError
from tasktune.data.tokenize import encode_prompt
from tasktune.lora.inject import use_adapters
from tasktune.serve.branch_scoring import pack_branches
from tasktune.serve.engine import Engine
from tasktune.serve.launch import build_server
from tasktune.train.run import train_strategy


def test_serve_a_run_folder(tmp_path, tiny_llama, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_llama, max_steps=3)
    runner, _, _ = train_strategy(cfg, "single", tmp_path / "run", progress=False)
    threads = []  # the model loads, and every step runs, on one thread (serve/torch_thread.py)
    load = Engine.from_pretrained.__func__
    monkeypatch.setattr(Engine, "from_pretrained", classmethod(
        lambda cls, *a, **k: (threads.append(threading.current_thread().name), load(cls, *a, **k))[1]))
    monkeypatch.setattr(Engine, "step", lambda self, step=Engine.step: (
        threads.append(threading.current_thread().name), step(self))[1])
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
    assert len(threads) > 1 and set(threads) == {"tasktune-engine"}
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


@pytest.mark.parametrize("strategy, adapter", [("single", "home_intent"), ("multi", "shared")])
def test_task_predict_serves_the_runs_own_tasks(tmp_path, tiny_llama, strategy, adapter):
    """A user-declared task (not in the built-in registry) is rendered with the run's own
    template, answered by the run's adapter for it, and parsed with the run's label set."""
    from tasktune.model.predict import score_labels
    from tasktune.model.restore import read_run, restore_runner, run_tasks
    from tasktune.serve.task_predictor import task_predictor
    from tasktune.tasks.spec import Example, Origin

    cfg = tiny_config(tmp_path, tiny_llama, max_steps=2)
    train_strategy(cfg, strategy, tmp_path / "run", progress=False)
    app, _ = build_server([tmp_path / "run"], None)
    text = "turn off the lights in the hall"
    with TestClient(app) as client:
        reply = client.post("/v1/tasks/home_intent/predict", json={"inputs": {"text": text}, "max_tokens": 32})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["model"] == adapter
        # each label scored whole after the prompt, as `tasktune eval` scores them (the labels as
        # branches of one prefill), so the served answer and its probability are eval's for the same run
        tasks = {t.name: t for t in run_tasks(*read_run(tmp_path / "run"))}
        query = task_predictor(tasks)("home_intent", {"text": text})
        assert len(query.answers) == len(tasks["home_intent"].labels) > 2
        example = Example(task="home_intent", uid="t", inputs={"text": text}, target="", origin=Origin("api", 0))
        runner = restore_runner(tmp_path / "run")  # (serving renders the canonical template: eval here too)
        runner.tasks["home_intent"] = replace(runner.tasks["home_intent"], templates=tasks["home_intent"].templates[:1])
        ref = score_labels(runner, tasks["home_intent"], [example])[0]
        assert body["valid"] and body["prediction"] == ref.value
        assert body["score"] == pytest.approx(ref.score, abs=1e-4)
        assert body["top"][0] == {"label": ref.value, "score": body["score"]}
        assert sum(t["score"] for t in body["top"]) <= 1 + 1e-6 and len(body["top"]) == min(5, len(query.answers))
        alone = client.post("/v1/tasks/home_intent/predict", json={"inputs": text, "max_tokens": 32})  # its one field
        assert alone.status_code == 200 and alone.json() == body
        plain = {"model": adapter, "prompt": query.prompt, "max_tokens": 32, "temperature": 0}
        free = client.post("/v1/tasks/home_intent/predict", json={"inputs": {"text": text}, "max_tokens": 6,
                                                                   "guided": False}).json()
        assert free["text"] == client.post("/v1/completions", json={**plain, "max_tokens": 6}).json()["choices"][0]["text"]
        missing = client.post("/v1/tasks/clinc150/predict", json={"inputs": {"text": text}})
        assert missing.status_code == 404
        assert "home_intent" in missing.json()["error"]["message"]
    # a context too short for the prompt and every label at once: the labels split over
    # several prefills, and the answer does not change
    tok = runner.tokenizer
    prompt_len = len(encode_prompt(tok, query.prompt))
    longest = max(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in query.answers)
    lengths = [len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in query.answers]
    assert len(pack_branches(prompt_len, lengths, prompt_len + longest + 1)) > 1
    app, _ = build_server([tmp_path / "run"], None, max_len=prompt_len + longest + 2)
    with TestClient(app) as client:
        split = client.post("/v1/tasks/home_intent/predict", json={"inputs": {"text": text}}).json()
        assert split["prediction"] == ref.value and split["score"] == pytest.approx(ref.score, abs=1e-4)


def test_serve_limits_reach_the_engine(tiny_llama, adapter_root):
    """--max-model-len and --max-num-seqs (vLLM's names) bound what the server accepts."""
    folders = sorted(p for p in adapter_root.iterdir() if (p / "adapter_config.json").is_file())[:2]
    app, names = build_server(folders, str(tiny_llama), max_len=16, max_running=2, max_waiting=1)
    assert names == sorted(p.name for p in folders)
    with TestClient(app) as client:
        long = client.post("/v1/completions", json={"model": names[0], "prompt": "word " * 40, "max_tokens": 2})
        assert long.status_code == 400
        assert "limit is 15" in long.json()["error"]["message"]
        ok = client.post("/v1/completions", json={"model": names[0], "prompt": "hi there", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
    with pytest.raises(TasktuneError, match="--dtype 'int8'"):
        build_server(folders, str(tiny_llama), dtype="int8")


def test_device_auto_and_bad_devices():
    from tasktune.serve.launch import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(TasktuneError, match="--device 'gpu0': use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(TasktuneError, match=r"--device 'cuda:1': PyTorch sees 0 GPU\(s\) here"):
            resolve_device("cuda:1")
