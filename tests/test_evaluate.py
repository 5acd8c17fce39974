"""Evaluation of causal LMs: label likelihood over the closed label set (always valid)
and generation + the task's parser (invalid outputs counted, never a crash)."""

from __future__ import annotations

from projects import tiny_config
from tasktune.eval.evaluate import evaluate_runner
from tasktune.model.load import load_model
from tasktune.model.predict import predict
from tasktune.train.run import build_runner, prepare_data


def test_causal_likelihood_and_generation(tmp_path, tiny_llama):
    cfg = tiny_config(tmp_path, tiny_llama)
    loaded = load_model(str(tiny_llama))
    data = prepare_data(cfg, loaded.family, tokenizer=loaded.tokenizer)
    runner = build_runner(cfg, loaded, data.tasks, "single")
    intent = runner.tasks["home_intent"]
    examples = data.test["home_intent"][:4]
    preds = predict(runner, intent, examples, mode="likelihood")
    assert all(p.valid and p.value in intent.labels for p in preds)
    assert all(0.0 < p.score <= 1.0 for p in preds)
    generated = predict(runner, intent, examples, mode="generate")
    assert len(generated) == 4 and all(isinstance(p.text, str) for p in generated)
    assert all(p.value is None for p in generated if not p.valid)

    test = {"home_intent": examples, "snips_slots": data.test["snips_slots"][:3]}
    scores = evaluate_runner(runner, test, n_resamples=50, progress=False)
    slots = scores["snips_slots"]
    assert slots.n == 3 and 0 <= slots.invalid <= 3  # an untrained model writes mostly junk: counted
    assert "slot_f1" in slots.metrics and "accuracy" in scores["home_intent"].metrics
