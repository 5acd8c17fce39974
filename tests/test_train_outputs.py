"""What `tasktune train` writes: PEFT adapters that PEFT loads with identical logits,
heads beside them, and a run record with config, seeds, versions and metrics."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from projects import tiny_config
from tasktune.lora.inject import use_adapters
from tasktune.model.restore import restore_runner
from tasktune.train.run import train_strategy


def test_single_writes_one_peft_adapter_per_task_that_peft_loads(tmp_path, tiny_llama):
    cfg = tiny_config(tmp_path, tiny_llama, max_steps=4)
    runner, result, data = train_strategy(cfg, "single", tmp_path / "run", progress=False)
    assert result.steps == 4
    for task in ("home_intent", "snips_slots"):
        folder = tmp_path / "run" / "adapters" / task
        assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        peft_model = PeftModel.from_pretrained(base, folder).eval()
        ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
        runner.eval()
        with torch.no_grad(), use_adapters(runner.handle, torch.tensor([runner.handle.index(task)])):
            ours = runner.model(input_ids=ids).logits
        with torch.no_grad():
            theirs = peft_model(input_ids=ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        # training moved the adapter away from the identity (B starts at zero)
        with torch.no_grad():
            plain = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(input_ids=ids).logits
        assert not torch.allclose(ours, plain, atol=1e-6)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["strategy"] == "single" and record["seed"] == 0 and "torch" in record["versions"]
    assert set(record["task_adapter"]) == {"home_intent", "snips_slots"}
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "task_loss" in json.loads(lines[-1])


def test_restored_runner_predicts_like_the_trained_one(tmp_path, tiny_bert):
    cfg = tiny_config(tmp_path, tiny_bert, max_steps=3)
    runner, _, data = train_strategy(cfg, "multi", tmp_path / "run", progress=False)
    restored = restore_runner(tmp_path / "run")
    batch = runner.collate(data.test["home_intent"][:4] + data.test["snips_slots"][:4])
    runner.eval()
    with torch.no_grad():
        a = runner.task_losses(batch)
        b = restored.task_losses(batch)
    for task in a:
        torch.testing.assert_close(a[task], b[task])


def test_export_merged_equals_adapter_logits(tmp_path, tiny_llama):
    from tasktune.export import export_run

    cfg = tiny_config(tmp_path, tiny_llama, max_steps=3)
    runner, _, _ = train_strategy(cfg, "single", tmp_path / "run", progress=False)
    written = export_run(tmp_path / "run", tmp_path / "merged", "merged")
    assert {p.name for p in written} == {"home_intent", "snips_slots"}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "home_intent").eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    runner.eval()
    with torch.no_grad(), use_adapters(runner.handle, torch.tensor([runner.handle.index("home_intent")])):
        ours = runner.model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-5)
    peft_dirs = export_run(tmp_path / "run", tmp_path / "peft", "peft")
    assert all((p / "adapter_model.safetensors").exists() for p in peft_dirs)


def test_cgc_run_restores_from_folded_adapters_with_equal_losses(tmp_path, tiny_llama):
    """The folded per-task adapters are what eval, export and serve read: they must give
    the CGC model's own losses."""
    cfg = tiny_config(tmp_path, tiny_llama, max_steps=3)
    runner, _, data = train_strategy(cfg, "cgc", tmp_path / "run", progress=False)
    with torch.no_grad():  # make gates and specific experts matter
        for layer in runner.handle.layers.values():
            layer.lora_B.normal_(std=0.05)
            layer.gate_logits.normal_()
    runner.save(tmp_path / "run")
    restored = restore_runner(tmp_path / "run")
    batch = runner.collate(data.test["home_intent"][:3] + data.test["snips_slots"][:3])
    runner.eval()
    with torch.no_grad():
        a, b = runner.task_losses(batch), restored.task_losses(batch)
    for task in a:
        torch.testing.assert_close(a[task], b[task], rtol=1e-5, atol=1e-6)
