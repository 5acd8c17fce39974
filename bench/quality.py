"""Quality on the full data (issue "Evaluation", quality section), run on the GPU.

MiniLM-L6 (the embedded default) on the full CLINC150, SNIPS intent and SNIPS slots
training sets, `single` vs `multi`, through exactly the code path of `tasktune compare`.
Writes the per-strategy, per-task metrics with 95% bootstrap CIs and the device name to
bench/results/quality.json (or --out) and prints a short table last.

    PYTHONPATH=. python3 bench/quality.py --model minilm --epochs 6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from tasktune.compare import run_compare
from tasktune.config import config_from_dict

TARGETS = {  # issue thresholds, for the better of single and multi
    ("clinc150", "in_scope_accuracy"): 0.94,
    ("snips_slots", "slot_f1"): 0.93,
    ("snips_intent", "accuracy"): 0.97,
}


def quality_config(model: str, epochs: float, rank: int, lr: float, head_lr: float, batch_size: int):
    return config_from_dict({
        "model": model,
        "seed": 0,
        "max_length": 64,
        "tasks": [{"builtin": "clinc150"}, {"builtin": "snips_intent"}, {"builtin": "snips_slots"}],
        "mixing": {"policy": "proportional"},
        "lora": {"r": rank, "alpha": 2 * rank, "dropout": 0.05},
        "train": {
            "lr": lr, "head_lr": head_lr, "batch_size": batch_size, "epochs": epochs,
            "warmup_ratio": 0.06, "schedule": "cosine", "log_every": 50,
        },
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm", help="minilm or a local folder (e.g. a carried copy)")
    ap.add_argument("--epochs", type=float, default=6)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--head-lr", type=float, default=5e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workdir", default="runs/quality")
    ap.add_argument("--out", default="bench/results/quality.json")
    ap.add_argument("--strategies", default="single,multi")
    args = ap.parse_args()

    cfg = quality_config(args.model, args.epochs, args.rank, args.lr, args.head_lr, args.batch_size)
    console = Console(width=120)
    started = time.time()
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    results = run_compare(cfg, strategies, Path(args.workdir), console=console)
    table = {
        s: {t: {m: {"value": v.value, "ci_low": v.ci_low, "ci_high": v.ci_high} for m, v in r.metrics.items()} for t, r in sr.tasks.items()}
        for s, sr in results.strategies.items()
    }
    checks = {}
    for (task, metric), target in TARGETS.items():
        best = max(table[s][task][metric]["value"] for s in table)
        checks[f"{task}/{metric}"] = {"target": target, "best": best, "met": best >= target,
                                      **{s: table[s][task][metric]["value"] for s in table}}
    notes = {s: {k: v for k, v in sr.notes.items() if k in ("groups", "steps")} for s, sr in results.strategies.items()}
    payload = {
        "device": results.environment.device,
        "versions": results.environment.versions,
        "model": args.model,
        "config": json.loads(cfg.model_dump_json()),
        "seconds": time.time() - started,
        "costs": {s: sr.costs.__dict__ for s, sr in results.strategies.items()},
        "metrics": table,
        "checks": checks,
        "notes": notes,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    console.print(f"device: {payload['device']}  seconds: {payload['seconds']:.0f}")
    for name, c in checks.items():
        per = "  ".join(f"{s} {c[s]:.4f}" for s in strategies)
        console.print(f"{name:30s} {per}  target {c['target']}  {'MET' if c['met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
