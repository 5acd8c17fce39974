"""Serving an encoder run: a batch that mixes tasks answers each row exactly as the row
alone and as `tasktune eval` does, in one forward with per-row adapters; the HTTP routes
give structured answers and clear errors."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from projects import tiny_config
from tasktune.errors import TasktuneError
from tasktune.model.predict import predict
from tasktune.model.restore import restore_runner
from tasktune.serve.encoder_engine import EncoderEngine
from tasktune.serve.launch import build_server
from tasktune.tasks.render import bio_spans, label_text, slots_text
from tasktune.train.run import train_strategy


def train_run(root, tiny_bert, strategy: str):
    """A few steps of training, then random adapter updates so that every adapter
    matters (a row on the wrong adapter would show)."""
    cfg = tiny_config(root, tiny_bert, max_steps=2)
    runner, _, data = train_strategy(cfg, strategy, root / "run", progress=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in runner.handle.layers.values():
            layer.lora_B.normal_(std=0.2)
            if strategy == "cgc":
                layer.gate_logits.normal_()
    runner.save(root / "run")
    return root / "run", data


@pytest.fixture(scope="module", params=["single", "multi", "cgc"])
def run(request, tmp_path_factory, tiny_bert):
    return train_run(tmp_path_factory.mktemp(request.param), tiny_bert, request.param)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_bert):
    return train_run(tmp_path_factory.mktemp("http"), tiny_bert, "single")


def interleaved(data, n: int = 3):
    intents, slots = data.test["home_intent"][:n], data.test["snips_slots"][:n]
    return [ex for pair in zip(intents, slots) for ex in pair]


def assert_same(served, predictions):
    for a, p in zip(served, predictions, strict=True):
        assert a.value == p.value
        if p.score is not None:
            torch.testing.assert_close(a.score, p.score)


def test_a_mixed_batch_answers_each_row_as_alone_and_as_eval(run):
    run_dir, data = run
    engine = EncoderEngine.from_run(run_dir)
    examples = interleaved(data)
    requests = [engine.example(ex.task, ex.inputs) for ex in examples]
    assert engine.example("snips_slots", "play the beatles").inputs == {"tokens": ["play", "the", "beatles"]}

    routes = []  # the adapter ids each forward of the encoder ran with
    hook = engine.runner.model.register_forward_pre_hook(lambda *_: routes.append(engine.runner.handle.routing.ids))
    try:
        mixed = engine.predict(requests, top_k=3)
    finally:
        hook.remove()
    index = engine.runner.adapter_index  # one forward over the mixed batch, each row on its task's adapter
    assert [ids.tolist() for ids in routes] == [[index[ex.task] for ex in examples]]

    alone = [engine.predict([r])[0] for r in requests]
    assert_same(mixed, alone)
    evaluator = restore_runner(run_dir)  # what `tasktune eval` reads
    for task in ("home_intent", "snips_slots"):
        mine = [i for i, ex in enumerate(examples) if ex.task == task]
        assert_same([mixed[i] for i in mine], predict(evaluator, evaluator.tasks[task], [examples[i] for i in mine]))

    labels = engine.tasks["home_intent"].labels
    for a in mixed[0::2]:  # classification: the label, its probability, the top 3
        assert a.value in labels and len(a.top) == 3 and a.top[0] == (a.value, a.score)
        assert [p for _, p in a.top] == sorted((p for _, p in a.top), reverse=True)
    for a, ex in zip(mixed[1::2], examples[1::2]):  # tagging: a tag per word, spans of them
        words = list(ex.inputs["tokens"])
        assert len(a.value) == len(words) and a.text == slots_text(words, a.value)
        assert [(x.slot, x.start, x.end) for x in a.slots] == bio_spans(a.value)
        assert all(x.value == " ".join(words[x.start : x.end]) for x in a.slots)


def test_concurrent_requests_share_forwards(single_run):
    run_dir, data = single_run
    engine = EncoderEngine.from_run(run_dir, max_batch=2)
    requests = [engine.example(ex.task, ex.inputs) for ex in interleaved(data)[:5]]
    expected = engine.predict(requests)
    forwards = []
    hook = engine.runner.model.register_forward_pre_hook(lambda *_: forwards.append(threading.current_thread().name))
    answers: dict[int, object] = {}
    threads = [threading.Thread(target=lambda i=i: answers.update({i: engine.submit(requests[i])})) for i in range(5)]
    with engine._model:  # a forward "runs": the five requests queue up behind it
        for t in threads:
            t.start()
        while engine.waiting < 5:
            time.sleep(0.001)
    for t in threads:
        t.join()
    hook.remove()
    assert forwards == ["tasktune-encoder"] * 3  # 2 + 2 + 1 requests, all on the engine's one torch thread
    assert_same([answers[i] for i in range(5)], expected)


def test_b_http_predict_gives_structured_answers(single_run):
    run_dir, data = single_run
    app, names = build_server([run_dir], None)
    assert names == ["home_intent", "snips_slots"]
    engine = EncoderEngine.from_run(run_dir)
    intent, slots = data.test["home_intent"][0], data.test["snips_slots"][0]
    want_intent, want_slots = engine.predict([engine.example(e.task, e.inputs) for e in (intent, slots)], top_k=2)
    with TestClient(app) as client:
        r = client.post("/v1/tasks/home_intent/predict", json={"inputs": {"text": intent.inputs["text"]}, "top_k": 2})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == "home_intent" and out["valid"] and out["prediction"] == want_intent.value
        assert out["text"] == label_text(engine.tasks["home_intent"], want_intent.value)  # "lights_on" -> "lights on"
        torch.testing.assert_close(out["score"], want_intent.score)
        assert [t["label"] for t in out["top"]] == [label for label, _ in want_intent.top]
        assert out["slots"] is None

        sentence = " ".join(slots.inputs["tokens"])
        r = client.post("/v1/tasks/snips_slots/predict", json={"inputs": {"text": sentence}})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["prediction"] == want_slots.value and out["text"] == want_slots.text
        assert out["slots"] == [dataclasses.asdict(x) for x in want_slots.slots]
        assert out["top"] is None and out["score"] is None
        for alone in (sentence, slots.inputs["tokens"]):  # a one-field task's value alone (HF's inference API)
            assert client.post("/v1/tasks/snips_slots/predict", json={"inputs": alone}).json() == out
        r = client.post("/v1/tasks/home_intent/predict", json={"inputs": intent.inputs["text"], "top_k": 2})
        assert r.json()["prediction"] == want_intent.value and [t["label"] for t in r.json()["top"]] == [
            label for label, _ in want_intent.top]

        cards = client.get("/v1/models").json()["data"][1:]  # after the base: each task and its adapter
        assert [(c["id"], c["root"]) for c in cards] == [("home_intent", "home_intent"), ("snips_slots", "snips_slots")]
        assert client.get("/health").json()["tasks"] == ["home_intent", "snips_slots"]
        assert 'endpoint="/v1/tasks/{task}/predict",status="200"' in client.get("/metrics").text


def test_c_http_errors_say_what_is_wrong(single_run):
    run_dir, _ = single_run
    app, _ = build_server([run_dir], None)
    with TestClient(app) as client:
        r = client.post("/v1/tasks/nope/predict", json={"inputs": {"text": "hi"}})
        assert r.status_code == 404 and "home_intent" in r.json()["error"]["message"]
        r = client.post("/v1/tasks/home_intent/predict", json={"text": "hi"})
        assert r.status_code == 422 and "inputs" in r.json()["error"]["message"]
        r = client.post("/v1/tasks/home_intent/predict", json={"inputs": {"utterance": "hi"}})
        assert r.status_code == 422 and "'text'" in r.json()["error"]["message"]
        r = client.post("/v1/tasks/snips_slots/predict", json={"inputs": {"tokens": []}})
        assert r.status_code == 422 and "tokens" in r.json()["error"]["message"]
        r = client.post("/v1/tasks/home_intent/predict", json={"inputs": {"text": "hi"}, "model": "snips_slots"})
        assert r.status_code == 400
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = client.post(path, json={"model": "home_intent", "prompt": "hi"})
            assert r.status_code == 400, path
            assert r.json()["error"]["message"] == "this server hosts an encoder run: use /v1/tasks/{task}/predict"
    with pytest.raises(TasktuneError, match="leave out --base"):
        build_server([run_dir], "minilm")
