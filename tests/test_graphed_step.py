"""The CUDA-graphed training step: its device-only loss and static inputs equal the plain
step (CPU, capture off), and on a GPU its replays equal eager steps."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from projects import tiny_config
from tasktune.errors import TasktuneError
from tasktune.model.load import load_model
from tasktune.train import loop
from tasktune.train.graphed_step import GraphedStep, graphable_adamw, scored_bucket, static_batch
from tasktune.train.run import build_runner, prepare_data, train_strategy


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


def _trained_adapters(tmp_path, model_dir, name, **train):
    (tmp_path / name).mkdir()
    cfg = tiny_config(tmp_path / name, model_dir, max_steps=4, batch_size=6, log_every=2, **train)
    cfg.lora.dropout = 0.0  # the static step and the plain one draw dropout in another order
    runner, result, _ = train_strategy(cfg, "multi", tmp_path / name / "out", progress=False)
    return _lora_state(runner), (tmp_path / name / "out" / "metrics.jsonl").read_text()


def test_the_loop_with_cuda_graphs_trains_like_the_plain_loop(tmp_path, tiny_llama):
    """train.cuda_graphs: on the CPU the loop takes the static step (what the GPU captures)."""
    plain, plain_log = _trained_adapters(tmp_path, tiny_llama, "plain")
    graphed, graphed_log = _trained_adapters(tmp_path, tiny_llama, "graphed", cuda_graphs=True)
    for a, b in zip(graphed, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    rows = [json.loads(x) for x in graphed_log.splitlines()]
    ref = [json.loads(x) for x in plain_log.splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [2, 4]
    for r, q in zip(rows, ref):
        assert r["task_loss"] == pytest.approx(q["task_loss"], rel=1e-4) and r["lr"] == pytest.approx(q["lr"])


def test_cuda_graphs_refuse_what_cannot_be_captured(tmp_path, tiny_llama):
    cfg = tiny_config(tmp_path, tiny_llama, max_steps=1, batch_size=4, cuda_graphs=True, grad_accum=2,
                      weighting={"method": "dwa"})
    with pytest.raises(TasktuneError, match="static loss weights only.*grad_accum 1 only"):
        train_strategy(cfg, "multi", tmp_path / "out", progress=False)


def test_a_graphed_run_resumes_from_its_checkpoint(tmp_path, tiny_llama, monkeypatch):
    """The capturable optimizer (tensor learning rates, device step counts) goes through a
    checkpoint and back: 2 steps, then resumed to 4, ends where 4 straight steps do."""
    opts = dict(batch_size=6, log_every=2, cuda_graphs=True, schedule="constant", warmup_ratio=0.0, checkpoint_every=2)
    whole = tiny_config(tmp_path, tiny_llama, max_steps=4, **opts)
    whole.lora.dropout = 0.0
    ref, _, _ = train_strategy(whole, "multi", tmp_path / "whole", progress=False)
    first = whole.model_copy(deep=True)
    first.train.max_steps = 2
    train_strategy(first, "multi", tmp_path / "cut", progress=False)
    loaded = []
    original = loop.load_checkpoint
    monkeypatch.setattr(loop, "load_checkpoint", lambda path, **kw: loaded.append(path.name) or original(path, **kw))
    resumed, result, _ = train_strategy(whole, "multi", tmp_path / "cut", resume=True, progress=False)
    assert loaded == ["checkpoint-2"] and result.steps == 4
    for a, b in zip(_lora_state(resumed), _lora_state(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
