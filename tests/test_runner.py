"""The shared runner: per-task losses, routing, packing, single-task gradient isolation."""

from __future__ import annotations

import copy

import pytest
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


def _examples(data):
    return data.train["home_intent"][:4] + data.train["snips_slots"][:5] + data.train["home_intent"][4:6]


def _float64_reference(runner, examples):
    """Per-task contributions to the batch-mean token loss, one example at a time through
    a float64 copy of the model routed to the example's own adapter."""
    from tasktune.data.tokenize import IGNORE, encode_causal
    from tasktune.lora.layer import MultiLoRALinear
    from tasktune.tasks.render import render

    model = copy.deepcopy(runner.model).double().eval()
    routing = next(m for m in model.modules() if isinstance(m, MultiLoRALinear)).routing
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for ex in examples:
        enc = encode_causal(runner.tokenizer, render(runner.tasks[ex.task], ex, runner.seed), runner.max_length)
        ids = torch.tensor([enc.input_ids])
        routing.set(torch.tensor([runner.adapter_index[ex.task]]))
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)  # [T, V] float64
        for t in range(len(enc.input_ids) - 1):
            if enc.labels[t + 1] != IGNORE:
                sums[ex.task] = sums.get(ex.task, 0.0) - float(logp[t, enc.labels[t + 1]])
                counts[ex.task] = counts.get(ex.task, 0) + 1
    total = sum(counts.values())
    return {t: sums[t] / total for t in sums}, {t: counts[t] / total for t in counts}


@pytest.mark.parametrize("pack", [True, False])
def test_causal_task_losses_match_float64_reference(tmp_path, tiny_llama, pack):
    """The device-side per-task split (host-planned targets, one index_select, split by
    host counts) equals a plain float64 loop over the examples, packed or padded."""
    runner, data = _setup(tmp_path, tiny_llama, "single")
    runner.eval()  # no dropout; autograd stays on, so the training dispatch runs
    examples = _examples(data)
    batch = runner.collate(examples, pack=pack)
    if pack:
        assert batch.input_ids.shape[1] % runner.pack_multiple == 0  # padded to a repeating width
    losses = runner.task_losses(batch)
    want, shares = _float64_reference(runner, examples)
    assert list(losses) == ["home_intent", "snips_slots"]  # first-appearance order, as before
    for task in want:
        got = losses[task].double()
        torch.testing.assert_close(got, torch.tensor(want[task], dtype=torch.float64), rtol=2e-6, atol=1e-7)
    assert runner.last_shares == pytest.approx(shares, abs=1e-12)
    assert all(isinstance(v, float) for v in runner.last_shares.values())


@pytest.mark.parametrize("segmented", [False, True])
def test_packed_training_step_never_reads_the_device(tmp_path, tiny_llama, monkeypatch, segmented):
    """A packed training step (loss and backward) on a model on the 'meta' device, which
    holds no data: any .item(), .tolist(), boolean indexing, nonzero or unique of a device
    tensor would raise. Everything the step must know is read from the host batch."""
    runner, data = _setup(tmp_path, tiny_llama, "single")
    runner.train()
    batch = runner.collate(_examples(data), pack=True)
    if segmented:  # the per-adapter path: its plan comes from the host copy of the ids
        monkeypatch.setattr("tasktune.lora.layer.MASKED_MAX_COLS", 0)
    runner.to("meta")
    losses = runner.task_losses(batch)
    sum(losses.values()).backward()
    assert set(losses) == {"home_intent", "snips_slots"} and all(v.device.type == "meta" for v in losses.values())
    assert sum(runner.last_shares.values()) == pytest.approx(1.0)
    assert all(layer.lora_A.grad is not None for layer in runner.handle.layers.values())


def test_compiled_blocks_match_eager(tmp_path, tiny_llama):
    """compile_blocks (here with the aot_eager backend: no C compiler on the test path)
    gives the eager losses and gradients, and keeps parameter names."""
    eager, data = _setup(tmp_path, tiny_llama, "single")
    compiled = copy.deepcopy(eager)
    names = [n for n, _ in compiled.named_parameters()]
    assert compiled.compile_blocks(backend="aot_eager") == 2
    assert [n for n, _ in compiled.named_parameters()] == names
    batch = eager.collate(_examples(data), pack=True)
    for runner in (eager, compiled):
        runner.eval()  # dropout off, so both draw nothing
        sum(runner.task_losses(batch).values()).backward()
    want, got = eager.task_losses(batch), compiled.task_losses(batch)
    for task in want:
        torch.testing.assert_close(got[task], want[task])
    for (_, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad)
