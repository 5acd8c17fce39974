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


def test_eval_lists_invalid_test_rows_instead_of_dropping_them_silently(tmp_path, tiny_bert):
    """`tasktune eval RUN_DIR` scores the valid rows and names every row it left out."""
    import json
    import shutil

    import yaml

    from projects import EXAMPLES, tiny_project
    from tasktune.config import load_config
    from tasktune.eval.evaluate import evaluate_run
    from tasktune.train.run import train_strategy

    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    path = tiny_project(tmp_path, tiny_bert, max_steps=1)
    raw = yaml.safe_load(path.read_text())
    for key, name in (("path", "train"), ("validation_path", "validation"), ("eval_path", "test")):
        raw["tasks"][0][key] = str(data / f"{name}.jsonl")
    path.write_text(yaml.safe_dump(raw))
    train_strategy(load_config(path), "single", tmp_path / "run", progress=False)
    test_file = data / "test.jsonl"
    good = len(test_file.read_text().splitlines())
    with test_file.open("a") as f:
        f.write(json.dumps({"text": "dim the hall lights"}) + "\n")  # no intent: line good + 1
    result = evaluate_run(tmp_path / "run", n_resamples=20)
    assert result.scores["home_intent"].n == good
    (row,) = result.skipped["home_intent"]
    assert row.startswith(f"{test_file}:{good + 1}: field 'intent'")
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["home_intent"]["skipped_test_rows"] == [row]
