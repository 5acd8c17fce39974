"""Data-parallel training matches one process (issue #3): 1 GPU vs W GPUs, same global batch.
`--strategy full --fsdp`: the W-process run shards the whole model (train.fsdp) instead.

Builds a randomly initialised Qwen2 (Qwen2.5-0.5B-shaped layers, vocab = a byte-level BPE
trained in the run on the bundled task texts; `--cpu`: 2 layers, hidden 64), writes a
project over the built-in tasks (clinc150, snips_intent, snips_slots, circa) and trains
strategy `multi` twice through the real entry point, `torchrun ... -m tasktune.cli train`:

    reference: 1 process  x batch W*b
    parallel:  W processes x batch b      (DDP; NCCL on GPUs, gloo with --cpu)

Same seed, same example stream, LoRA dropout 0 (Qwen2 has no other dropout), fp32 weights
by default, constant learning rate. Writes ddp_check.json: both runs' per-step, per-task
loss curves, the largest relative difference between them, each run's training-loop
seconds and tokens/s (non-padding tokens of the examples the steps consumed, replayed
from the seeded sampler), the device and versions.

    python bench/ddp_check.py                    # on a machine with >= 2 GPUs (nvidia-h200-x2)
    .venv/bin/python bench/ddp_check.py --cpu    # smoke run: gloo, tiny model, a few steps

It launches torchrun itself (one launch per run), so start it with plain python. The GPU
image lacks pydantic: carry its wheels as bench/README.md says.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import LORA_TARGETS as TARGETS, bpe_tokenizer  # noqa: E402

TASKS = ["clinc150", "snips_intent", "snips_slots", "circa"]


# --- model, tokenizer, project ---------------------------------------------------------------
def task_texts(per_task: int, seed: int) -> list[str]:
    from tasktune.data.load import load_tasks
    from tasktune.tasks.builtin import builtin_tasks
    from tasktune.tasks.render import render

    bt = builtin_tasks()
    loaded = load_tasks([bt[n] for n in TASKS], max_examples={"train": per_task}, seed=seed)
    texts = []
    for n in TASKS:
        for ex in loaded[n]["train"].examples:
            rendered = render(loaded[n]["train"].task, ex, seed)
            texts.append(rendered.prompt + " " + rendered.target)
    return texts


def build_model(folder: Path, tokenizer, tiny: bool, seed: int) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = (
        dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if tiny else
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)
    )
    config = Qwen2Config(
        vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6,
        rms_norm_eps=1e-6, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return {**shape, "vocab_size": len(tokenizer), "weights": "random init (seed %d), fp32" % seed}


def write_project(path: Path, model: Path, args, batch_size: int) -> Path:
    raw = {
        "model": str(model),
        "seed": args.seed,
        "max_length": args.max_length,
        "tasks": [{"builtin": n, "max_examples": {"train": args.per_task, "validation": 8, "test": 8}} for n in TASKS],
        "mixing": {"policy": "temperature", "temperature": 2.0},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
        "train": {
            "batch_size": batch_size, "max_steps": args.steps, "lr": args.lr, "warmup_ratio": 0.0,
            "schedule": "constant", "log_every": 1, "precision": args.precision, "max_tokens": args.pack_tokens,
            "fsdp": args.fsdp, "full_lr": args.lr,
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


# --- runs --------------------------------------------------------------------------------------
def launch(config: Path, out: Path, procs: int, cpu: bool, strategy: str) -> dict:
    """`torchrun --nproc_per_node procs -m tasktune.cli train config --strategy STRATEGY`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
        "-m", "tasktune.cli", "train", str(config), "--strategy", strategy, "--out", str(out),
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-6000:])
        raise SystemExit(f"{procs}-process run failed ({done.returncode})")
    record = json.loads((out / "run.json").read_text())
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "processes": record["result"]["processes"],
        "batch_size_per_process": yaml.safe_load(config.read_text())["train"]["batch_size"],
        "train_seconds": record["result"]["seconds"],
        "launch_wall_seconds": wall,
        "peak_memory_mb": record["result"]["peak_memory_mb"],
        "sharded": record["result"].get("sharded", False),
        "device": record["versions"]["device"],
        "task_loss": [row["task_loss"] for row in log],
    }


def consumed_tokens(config: Path, steps: int) -> dict[str, int]:
    """Tokens of the examples the run's steps consumed: the seeded sampler replayed."""
    from tasktune.config import load_config
    from tasktune.data.sampler import MixtureSampler
    from tasktune.data.tokenize import encode_causal
    from tasktune.model.load import load_tokenizer
    from tasktune.tasks.render import render
    from tasktune.train.run import prepare_data

    cfg = load_config(config)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg, "causal", tokenizer=tokenizer)
    tasks = {t.name: t for t in data.tasks}
    sampler = MixtureSampler({t: len(v) for t, v in data.train.items() if v}, cfg.mixing, cfg.seed)
    tokens = targets = 0
    for step in range(steps):
        sampler.set_step(step)
        for name, i in sampler.draw(cfg.train.batch_size * cfg.train.grad_accum):
            enc = encode_causal(tokenizer, render(tasks[name], data.train[name][i], cfg.seed), cfg.max_length)
            tokens += len(enc)
            targets += sum(1 for label in enc.labels[1:] if label != -100)
    return {"tokens": tokens, "target_tokens": targets}


def max_relative_difference(a: list[dict], b: list[dict]) -> tuple[float, dict]:
    worst, where = 0.0, {}
    for step, (ra, rb) in enumerate(zip(a, b), start=1):
        if ra.keys() != rb.keys():
            return float("inf"), {"step": step, "tasks": [sorted(ra), sorted(rb)]}
        for task in ra:
            rel = abs(ra[task] - rb[task]) / max(abs(ra[task]), 1e-12)
            if rel > worst:
                worst, where = rel, {"step": step, "task": task, "reference": ra[task], "parallel": rb[task]}
    return worst, where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="smoke run on the CPU: gloo, tiny model, few steps")
    ap.add_argument("--procs", type=int, default=2, help="processes (GPUs) of the parallel run")
    ap.add_argument("--batch", type=int, default=None, help="examples per process per step (default 16; --cpu 4)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40; --cpu 5)")
    ap.add_argument("--per-task", type=int, default=None, help="train examples per task (default 2000; --cpu 40)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--pack-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategy", choices=["multi", "full"], default="multi")
    ap.add_argument("--fsdp", action="store_true", help="train.fsdp: shard the model over the processes (strategy full)")
    ap.add_argument("--rtol", type=float, default=None, help="pass if every loss is this close (default 1e-3; --cpu 1e-4)")
    ap.add_argument("--results", default=None, help="JSON path (default bench/results/ddp_check[_fsdp][_cpu].json)")
    ap.add_argument("--workdir", default=None, help="keep the model and run folders here (default: a temporary folder)")
    args = ap.parse_args()
    cpu = args.cpu
    args.batch = args.batch or (4 if cpu else 16)
    args.steps = args.steps or (5 if cpu else 40)
    args.per_task = args.per_task or (40 if cpu else 2000)
    rtol = args.rtol or (1e-4 if cpu else 1e-3)
    name = "ddp_check" + ("_fsdp" if args.fsdp else "") + ("_cpu" if cpu else "") + ".json"
    results = Path(args.results or REPO / "bench" / "results" / name)
    if not cpu and torch.cuda.device_count() < args.procs:
        raise SystemExit(f"{args.procs} GPUs needed, {torch.cuda.device_count()} visible (use --cpu for a smoke run)")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ddp_check-"))
    t0 = time.perf_counter()
    tokenizer = bpe_tokenizer(task_texts(args.per_task, args.seed), 4000 if cpu else 32000)
    model_shape = build_model(work / "model", tokenizer, tiny=cpu, seed=args.seed)
    print(f"model and tokenizer built in {time.perf_counter() - t0:.0f}s -> {work}", flush=True)

    global_batch = args.procs * args.batch
    ref_cfg = write_project(work / "one" / "project.yaml", work / "model", args, global_batch)
    par_cfg = write_project(work / "par" / "project.yaml", work / "model", args, args.batch)
    runs = {}
    for key, config, procs in (("reference", ref_cfg, 1), ("parallel", par_cfg, args.procs)):
        runs[key] = launch(config, config.parent / "run", procs, cpu, args.strategy)
        print(f"{key}: {procs} process(es) x batch {runs[key]['batch_size_per_process']}: "
              f"{runs[key]['train_seconds']:.1f}s training", flush=True)
    counted = consumed_tokens(ref_cfg, args.steps)
    for run in runs.values():
        run["tokens_per_s"] = counted["tokens"] / run["train_seconds"]
        run["target_tokens_per_s"] = counted["target_tokens"] / run["train_seconds"]
    worst, where = max_relative_difference(runs["reference"]["task_loss"], runs["parallel"]["task_loss"])

    import accelerate
    import transformers

    report = {
        "bench": "ddp_check",
        "device": runs["parallel"]["device"] + ("" if cpu else f" x {args.procs}"),
        "backend": "gloo (CPU)" if cpu else "nccl",
        "host": platform.node(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__, "python": platform.python_version()},
        "config": {
            "model": model_shape, "tasks": TASKS, "per_task_train_examples": args.per_task, "strategy": args.strategy, "fsdp": args.fsdp,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": TARGETS}, "steps": args.steps,
            "global_batch": global_batch, "processes": args.procs, "batch_per_process": args.batch,
            "lr": args.lr, "schedule": "constant", "precision": args.precision, "max_length": args.max_length,
            "pack_tokens": args.pack_tokens, "seed": args.seed,
        },
        "consumed": counted,
        "runs": runs,
        "max_rel_diff": worst,
        "max_rel_diff_at": where,
        "rtol": rtol,
        "match": worst <= rtol,
        "speedup": runs["reference"]["train_seconds"] / runs["parallel"]["train_seconds"],
        "tokens_per_s_note": "non-padding tokens of the consumed examples / the training loop's seconds "
                             "(run.json result.seconds, rank 0; first steps include warm-up)",
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=1) + "\n")
    out_copy = Path(os.environ["OUT"]) / results.name if os.environ.get("OUT") else None
    if out_copy and out_copy.resolve() != results.resolve():
        shutil.copy(results, out_copy)
    print(f"max relative loss difference {worst:.2e} (rtol {rtol:g}): {'match' if worst <= rtol else 'MISMATCH'}; "
          f"tokens/s {runs['reference']['tokens_per_s']:.0f} (1 process) vs {runs['parallel']['tokens_per_s']:.0f} "
          f"({args.procs} processes) -> {results}", flush=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    if worst > rtol:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
