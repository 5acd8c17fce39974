"""The shared runner: per-task losses, routing, packing, single-task gradient isolation."""

from __future__ import annotations

import torch

from projects import tiny_config
from tasktune.model.load import load_model
from tasktune.train.run import build_runner, prepare_data


def _setup(tmp_path, model_dir, strategy):
    cfg = tiny_config(tmp_path, model_dir)
    loaded = load_model(str(model_dir))
    data = prepare_data(cfg, loaded.family, tokenizer=loaded.tokenizer)
    runner = build_runner(cfg, loaded, data.tasks, strategy)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B so that gradients reach A too
        for layer in runner.handle.layers.values():
            layer.lora_B.normal_(std=0.05)
    return runner, data


def _adapter_grads(runner, name):
    k = runner.handle.index(name)
    return [g for layer in runner.handle.layers.values() for g in (layer.lora_A.grad[k], layer.lora_B.grad[k])]


def test_single_adapter_gradient_is_zero_without_its_task_causal(tmp_path, tiny_llama):
    runner, data = _setup(tmp_path, tiny_llama, "single")
    runner.train()
    batch = runner.collate(data.train["home_intent"][:6], pack=True)
    losses = runner.task_losses(batch)
    assert set(losses) == {"home_intent"}
    sum(losses.values()).backward()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in _adapter_grads(runner, "snips_slots"))
    assert any(g.abs().sum() > 0 for g in _adapter_grads(runner, "home_intent"))


def test_single_adapter_gradient_is_zero_without_its_task_encoder(tmp_path, tiny_bert):
    runner, data = _setup(tmp_path, tiny_bert, "single")
    batch = runner.collate(data.train["snips_slots"][:6])
    sum(runner.task_losses(batch).values()).backward()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in _adapter_grads(runner, "home_intent"))
    assert any(g.abs().sum() > 0 for g in _adapter_grads(runner, "snips_slots"))
    assert runner.heads["home_intent"].proj.weight.grad is None


def test_packed_losses_equal_padded_losses(tmp_path, tiny_llama):
    """Packing is an implementation detail: per-task losses equal pad-to-longest ones."""
    runner, data = _setup(tmp_path, tiny_llama, "single")
    runner.eval()
    examples = data.train["home_intent"][:5] + data.train["snips_slots"][:5]
    with torch.no_grad():
        packed = runner.task_losses(runner.collate(examples, pack=True))
        padded = runner.task_losses(runner.collate(examples, pack=False))
    assert set(packed) == set(padded) == {"home_intent", "snips_slots"}
    for task in packed:
        torch.testing.assert_close(packed[task], padded[task], rtol=1e-5, atol=1e-6)
    # fewer rows than examples: several examples share a row
    assert runner.collate(examples, pack=True).input_ids.shape[0] < len(examples)


def test_multi_routes_every_task_to_the_shared_adapter(tmp_path, tiny_bert):
    runner, data = _setup(tmp_path, tiny_bert, "multi")
    assert set(runner.adapter_index.values()) == {runner.handle.index("shared")}
    batch = runner.collate(data.train["home_intent"][:3] + data.train["snips_slots"][:3])
    assert batch.adapter_ids.tolist() == [0] * 6
