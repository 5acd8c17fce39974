"""One training run from a config (tasktune/train/run.py): the train settings that shape
the runner (`head_dropout`, `compile`) reach it."""

from __future__ import annotations

import pytest
import torch
import yaml

from projects import tiny_config, tiny_project
from tasktune.config import load_config
from tasktune.errors import ConfigError
from tasktune.model.runner import Runner
from tasktune.train import run


def test_head_dropout_comes_from_the_config(tmp_path, tiny_bert):
    for p in (0.1, 0.0, 0.3):
        folder = tmp_path / str(p)
        folder.mkdir()
        cfg = tiny_config(folder, tiny_bert, **({} if p == 0.1 else {"head_dropout": p}))  # 0.1: the default
        loaded = run.load_model(cfg.model)
        data = run.prepare_data(cfg, loaded.family, tokenizer=loaded.tokenizer)
        runner = run.build_runner(cfg, loaded, data.tasks, "multi")
        assert runner.heads and all(head.dropout.p == p for head in runner.heads.values())


def test_bad_head_dropout_names_file_line_and_key(tmp_path, tiny_bert):
    path = tiny_project(tmp_path, tiny_bert, head_dropout=1.5)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "head_dropout" in text)
    with pytest.raises(ConfigError, match=rf"project.yaml:{line}: train.head_dropout: Input should be less than 1"):
        load_config(path)


def test_compile_compiles_the_blocks_before_training(tmp_path, tiny_llama, monkeypatch):
    calls = []
    eager = Runner.compile_blocks

    def compile_blocks(self, **options):
        calls.append(options)
        return eager(self, backend="aot_eager")  # no C compiler on the test path

    monkeypatch.setattr(Runner, "compile_blocks", compile_blocks)
    for compile_ in (False, True):
        folder = tmp_path / str(compile_)
        folder.mkdir()
        cfg = tiny_config(folder, tiny_llama, max_steps=2, compile=compile_)
        _, result, _ = run.train_strategy(cfg, "single", folder / "run", progress=False)
        assert result.steps == 2 and len(calls) == int(compile_)
        assert yaml.safe_load((folder / "run" / "config.json").read_text())["train"]["compile"] is compile_


@pytest.mark.parametrize("gate_lr", [None, 0.05])
def test_cgc_gates_get_their_own_learning_rate(tmp_path, tiny_bert, gate_lr):
    """train.gate_lr puts every CGC gate parameter (and nothing else) in its own optimizer
    group; without it the gates learn with the adapters."""
    from tasktune.model.load import load_model
    from tasktune.train.loop import _optimizer
    from tasktune.train.run import build_runner, prepare_data

    extra = {"gate_lr": gate_lr} if gate_lr else {}
    cfg = tiny_config(tmp_path, tiny_bert, **extra)
    loaded = load_model(cfg.model)
    data = prepare_data(cfg, loaded.family, tokenizer=loaded.tokenizer)
    runner = build_runner(cfg, loaded, data.tasks, "cgc")
    gates = {id(p) for n, p in runner.model.named_parameters() if n.endswith(".gate_logits")}
    assert gates  # one per adapted linear
    groups = _optimizer(runner, cfg.train, []).param_groups
    # training on a GPU: the fused AdamW, decided before `prepare` moves the parameters there
    assert not _optimizer(runner, cfg.train, []).defaults["fused"]
    assert _optimizer(runner, cfg.train, [], device=torch.device("cuda")).defaults["fused"]
    grouped = [{id(p) for p in g["params"]} for g in groups]
    if gate_lr:
        (k,) = [i for i, g in enumerate(grouped) if g & gates]  # one group holds the gates, nothing else
        assert grouped[k] == gates and groups[k]["lr"] == gate_lr and groups[k]["weight_decay"] == 0.0
    else:
        assert gates <= grouped[0] and groups[0]["lr"] == cfg.train.lr
    everything = {id(p) for p in runner.trainable_parameters()}
    assert set().union(*grouped) == everything and sum(len(g) for g in grouped) == len(everything)
