"""The CUDA-graphed training step: its device-only loss and static inputs equal the plain
step (CPU, capture off), and on a GPU its replays equal eager steps."""

from __future__ import annotations

import copy

import pytest
import torch

from projects import tiny_config
from tasktune.errors import TasktuneError
from tasktune.model.load import load_model
from tasktune.train.graphed_step import GraphedStep, graphable_adamw, scored_bucket, static_batch
from tasktune.train.run import build_runner, prepare_data


def _setup(tmp_path, model_dir, strategy="single", device="cpu"):
    cfg = tiny_config(tmp_path, model_dir)
    loaded = load_model(str(model_dir))
    data = prepare_data(cfg, loaded.family, tokenizer=loaded.tokenizer)
    runner = build_runner(cfg, loaded, data.tasks, strategy).to(device)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B so that gradients reach A too
        for layer in runner.handle.layers.values():
            layer.lora_B.normal_(std=0.05)
    runner.train()
    return runner, data


def _plain_step(runner, opt, batch):
    opt.zero_grad(set_to_none=True)
    losses = runner.task_losses(batch)
    sum(losses.values()).backward()
    opt.step()
    return {k: v.detach() for k, v in losses.items()}


def _lora_state(runner):
    return [p.detach().clone() for p in runner.handle.parameters()]


@pytest.mark.parametrize("pack", [True, False])
def test_static_step_equals_the_plain_step(tmp_path, tiny_llama, pack):
    runner, data = _setup(tmp_path, tiny_llama)
    twin = copy.deepcopy(runner)
    batches = [
        runner.collate(data.train["home_intent"][:4] + data.train["snips_slots"][:5], pack=pack),
        runner.collate(data.train["snips_slots"][5:9], pack=pack),  # one task absent: it adds exactly 0
    ]
    ref_opt = graphable_adamw(twin.trainable_parameters(), 1e-2, torch.device("cpu"))
    step = GraphedStep(runner, graphable_adamw(runner.trainable_parameters(), 1e-2, torch.device("cpu")),
                       autocast=None, capture=False)
    for i, batch in enumerate(batches):
        torch.manual_seed(i)  # the same LoRA dropout draws in both
        ours = step(batch)
        torch.manual_seed(i)
        ref = _plain_step(twin, ref_opt, batch)
        assert set(ours) == set(ref)
        for task in ref:
            torch.testing.assert_close(ours[task], ref[task], rtol=1e-5, atol=1e-6)
        assert runner.last_shares == pytest.approx(twin.last_shares)
        for a, b in zip(_lora_state(runner), _lora_state(twin)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert step.eager == 2 and not step.graphs


def test_static_batch_pads_scored_positions_to_a_bucket(tmp_path, tiny_llama):
    runner, data = _setup(tmp_path, tiny_llama)
    batch = runner.collate(data.train["home_intent"][:3], pack=True)
    s = static_batch(batch, tuple(runner.tasks))
    n = sum(batch.targets.counts)
    B, T = batch.input_ids.shape
    assert s.position.shape[0] == scored_bucket(n, B * T) >= n
    assert (s.labels[n:] == -100).all() and (s.task[n:] == 0).all()
    assert float(s.inv_total) == pytest.approx(1 / n)
    assert scored_bucket(1, 4096) == scored_bucket(1024, 4096) == 1024 and scored_bucket(1025, 4096) == 2048


def test_capture_refuses_an_optimizer_it_cannot_capture(tmp_path, tiny_llama):
    runner, _ = _setup(tmp_path, tiny_llama)
    with pytest.raises(TasktuneError, match="CUDA graphs need a CUDA device"):
        GraphedStep(runner, torch.optim.AdamW(runner.trainable_parameters()), capture=True)


def test_encoders_are_refused(tmp_path, tiny_bert):
    runner, _ = _setup(tmp_path, tiny_bert)
    with pytest.raises(TasktuneError, match="causal LMs only"):
        GraphedStep(runner, graphable_adamw(runner.trainable_parameters(), 1e-3, torch.device("cpu")), capture=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_replayed_graph_steps_equal_eager_steps_on_the_gpu(tmp_path, tiny_llama):
    runner, data = _setup(tmp_path, tiny_llama, device="cuda")
    runner.eval()  # no LoRA dropout: a replay draws other random numbers than an eager step
    twin = copy.deepcopy(runner)
    dev = torch.device("cuda")
    step = GraphedStep(runner, graphable_adamw(runner.trainable_parameters(), 1e-2, dev), autocast=None)
    ref = GraphedStep(twin, graphable_adamw(twin.trainable_parameters(), 1e-2, dev), autocast=None, capture=False)
    examples = data.train["home_intent"][:4] + data.train["snips_slots"][:4]
    batch = runner.collate(examples, pack=True)
    for _ in range(4):  # the first runs eagerly and captures; the next three replay
        ours, theirs = step(batch), ref(batch)
        for task in theirs:
            torch.testing.assert_close(ours[task], theirs[task], rtol=1e-4, atol=1e-5)
    assert step.captured == 1 and step.replayed == 3
    for a, b in zip(_lora_state(runner), _lora_state(twin)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
