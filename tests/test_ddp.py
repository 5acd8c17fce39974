"""Data-parallel training (tasktune/train/distributed.py): two gloo processes on the CPU
with batch b follow one process with batch 2b, step for step, and end with the same
adapters and heads, or with strategy `full` sharded over the two (FSDP2, sharded.py) the
same model; a two-process run resumed from rank 0's checkpoint ends exactly where the
uninterrupted one ends (DDP and sharded).

Runs without dropout (LoRA dropout 0, a BERT copy with dropout 0, `train.head_dropout: 0`),
so that neither run draws random numbers and only float round-off differs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from projects import tiny_project
from tasktune.config import load_config
from tasktune.errors import TasktuneError
from tasktune.train import run
from tasktune.train.distributed import check_weighting, task_units

WORKER = Path(__file__).parent / "ddp_worker.py"
STEPS, B = 4, 2  # per-process batch B; the one-process reference uses 2 * B
TRAIN = {"max_steps": STEPS, "grad_accum": 2, "checkpoint_every": 2, "log_every": 1, "head_dropout": 0.0}


def _no_dropout_bert(tiny_bert: Path, root: Path) -> Path:
    out = root / "tiny-bert-no-dropout"
    shutil.copytree(tiny_bert, out)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    files = ("adapters/*/adapter_model.safetensors", "heads/*.safetensors", "model/*.safetensors")  # model/: strategy full
    for f in [f for pattern in files for f in sorted(run_dir.glob(pattern))]:
        out.update({f"{f.parent.name}/{f.name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def _assert_same_curve(one: Path, two: Path) -> None:
    a, b = _log(one), _log(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert ra["lr"] == rb["lr"]
        for key in ("task_loss", "weights"):
            assert ra[key].keys() == rb[key].keys(), (ra, rb)
            for task in ra[key]:
                assert rb[key][task] == pytest.approx(ra[key][task], rel=1e-4), f"step {ra['step']} {key} {task}"
    ta, tb = _tensors(one), _tensors(two)
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        torch.testing.assert_close(tb[name], ta[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_processes_follow_one_process_with_the_doubled_batch(tmp_path, tiny_llama, tiny_bert):
    bert = _no_dropout_bert(tiny_bert, tmp_path)
    lora = {"dropout": 0.0}
    cases = {  # name: (model, strategy, extra train settings)
        "llama_multi": (tiny_llama, "multi", {}),  # packed causal batches, static weights
        "llama_single": (tiny_llama, "single", {}),  # an adapter per task: unused on a rank without the task
        "bert_multi": (bert, "multi", {"weighting": {"method": "uncertainty"}}),  # heads, token + sequence tasks
        "llama_full_fsdp": (tiny_llama, "full", {"fsdp": True}),  # sharded (FSDP2); one process: plain
    }
    jobs = []
    for name, (model, strategy, extra) in cases.items():
        for world in (1, 2):
            folder = tmp_path / f"{name}_w{world}"
            folder.mkdir()
            tiny_project(folder, model, lora=lora, batch_size=B * (3 - world), **TRAIN, **extra)
        jobs.append({"config": str(tmp_path / f"{name}_w2" / "project.yaml"), "strategy": strategy, "out": str(tmp_path / f"{name}_w2" / "run")})
    resumed = tmp_path / "llama_multi_w2" / "resumed"
    jobs.append({**jobs[0], "out": str(resumed), "resume_from": jobs[0]["out"], "at_step": 2})
    resumed_fsdp = tmp_path / "llama_full_fsdp_w2" / "resumed"  # weights and AdamW state gathered, then sharded again
    jobs.append({**jobs[3], "out": str(resumed_fsdp), "resume_from": jobs[3]["out"], "at_step": 2})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path / "jobs.json")]
    two = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-4000:]
    assert two.stdout.count("trained ") == len(jobs), two.stdout  # rank 0 reports, rank 1 stays quiet

    for name, (_, strategy, _) in cases.items():
        one = tmp_path / f"{name}_w1" / "run"
        run.train_strategy(load_config(tmp_path / f"{name}_w1" / "project.yaml"), strategy, one, progress=False)
        two_dir = tmp_path / f"{name}_w2" / "run"
        _assert_same_curve(one, two_dir)
        record = json.loads((two_dir / "run.json").read_text())
        assert record["result"]["processes"] == 2 and record["result"]["steps"] == STEPS
        assert record["result"]["sharded"] == (strategy == "full")
        assert sorted(p.name for p in (two_dir / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]

    for done, again in ((tmp_path / "llama_multi_w2" / "run", resumed), (tmp_path / "llama_full_fsdp_w2" / "run", resumed_fsdp)):
        assert _log(again) == _log(done)
        ta, tb = _tensors(done), _tensors(again)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_task_units_match_the_runner(tmp_path, tiny_llama, tiny_bert):
    """The loss normalisation GlobalLosses undoes is the runner's: the shares agree."""
    for model in (tiny_llama, tiny_bert):
        folder = tmp_path / model.name
        folder.mkdir()
        cfg = load_config(tiny_project(folder, model))
        loaded = run.load_model(cfg.model)
        data = run.prepare_data(cfg, loaded.family, tokenizer=loaded.tokenizer)
        runner = run.build_runner(cfg, loaded, data.tasks, "multi")
        examples = [ex for task in data.train.values() for ex in task[:5]]
        for pack in ((False, True) if loaded.family == "causal" else (False,)):
            batch = runner.collate(examples, pack=pack)
            with torch.no_grad():
                losses = runner.task_losses(batch)
            units = task_units(runner, batch)
            total = sum(w for _, w in units.values())
            assert units.keys() == losses.keys()
            assert {t: w / total for t, (_, w) in units.items()} == pytest.approx(runner.last_shares)


def test_per_task_gradient_weightings_need_one_process():
    for method in ("pcgrad", "gradnorm"):
        check_weighting(method, 1)
        with pytest.raises(TasktuneError, match=method):
            check_weighting(method, 2)
    for method in ("static", "uncertainty", "dwa"):
        check_weighting(method, 2)


def test_sharding_is_refused_where_it_does_not_apply(tmp_path, tiny_llama, tiny_bert):
    for model, strategy, why in ((tiny_llama, "multi", "strategy `full` only"), (tiny_bert, "full", "causal LMs only")):
        folder = tmp_path / f"{model.name}-{strategy}"
        folder.mkdir()
        cfg = load_config(tiny_project(folder, model, max_steps=1, fsdp=True))
        with pytest.raises(TasktuneError, match=f"train.fsdp: .*{why}"):
            run.train_strategy(cfg, strategy, folder / "run", progress=False)
