"""A synthetic comparison (four tasks, two strategies, hostile text) shared by the report tests."""

from __future__ import annotations

import random

from tasktune.eval.results import (
    ComparisonResults,
    Costs,
    Environment,
    ForgettingDelta,
    StrategyResult,
    TaskInfo,
    TaskResult,
    TrainingCurve,
    TransferMatrix,
)

EVIL = "<script>alert('x')</script> & \"quotes\""
INTENTS = [f"intent_{i}" for i in range(24)] + ["oos"]


def _tasks(rng: random.Random):
    clinc_golds = [rng.choice(INTENTS) for _ in range(300)]
    tag_golds = [["B-city", "I-city", "O", "B-date"], ["O", "B-artist", "O", "O"], ["O", "O", "B-x", "I-x"]] * 30
    gen_golds = [[f"person one asks about item {i}", f"they discuss item {i}"] for i in range(40)]
    yn_labels = ["Yes", "No", "Probably yes", "In the middle"]
    yn_golds = [rng.choice(yn_labels) for _ in range(200)]
    return {
        "clinc150": TaskInfo("clinc150", "classification", "accuracy", 2.0, INTENTS, None, clinc_golds),
        "snips_slots": TaskInfo("snips_slots", "tagging", "slot_f1", 1.0, ["city", "date", "artist", "x"], None, tag_golds),
        "dialogsum": TaskInfo("dialogsum", "generation", "rougeL", 1.0, None, None, gen_golds),
        "circa": TaskInfo("circa", "yesno", "accuracy", 1.0, yn_labels, {"Probably yes": "Yes"}, yn_golds),
    }


def _predict(info: TaskInfo, quality: float, rng: random.Random):
    out = []
    for g in info.golds:
        ok = rng.random() < quality
        if rng.random() < 0.03:
            out.append(None)
        elif info.kind == "tagging":
            out.append(list(g) if ok else ["O"] * len(g))
        elif info.kind == "generation":
            out.append(g[0] if ok else "an unrelated sentence")
        else:
            out.append(g if ok else rng.choice(info.labels))
    return out


def synthetic_results(seed: int = 0, quality: dict[str, float] | None = None) -> ComparisonResults:
    rng = random.Random(seed)
    tasks = _tasks(rng)
    quality = quality or {"single": 0.9, "multi": 0.75, "cgc": 0.85}
    strategies = {}
    for k, (name, q) in enumerate(quality.items()):
        results = {}
        for t, info in tasks.items():
            preds = _predict(info, q, rng)
            inputs = [f"{EVIL} example {i}" for i in range(len(info.golds))]
            results[t] = TaskResult.from_predictions(
                info.kind, preds, info.golds, inputs=inputs, labels=info.labels, label_map=info.label_map,
                task_name=t, n_resamples=300, seed=1,
            )
        curve = TrainingCurve(list(range(0, 100, 10)), {t: [2.0 / (1 + s / 20) + 0.1 * k for s in range(0, 100, 10)] for t in tasks})
        curve.losses["circa"][3] = None
        costs = Costs(1_000_000 * (k + 1), 60.0 * (k + 1), 900.0, 500.0 + 10 * k, 15.0 * (k + 1), 250_000)
        strategies[name] = StrategyResult(name, results, curve, costs)
    names = list(tasks)
    transfer = TransferMatrix(names, [[None if i == j else 0.01 * (i - j) for j in range(4)] for i in range(4)], "pairwise gain")
    forgetting = [ForgettingDelta("multi", "wikitext", "perplexity", 12.0, 12.6)]
    env = Environment({"python": "3.11", "tasktune": "0.1.0"}, "cpu", {"train": 0}, {"model": EVIL, "lr": 2e-4}, "2024-01-01T00:00:00")
    return ComparisonResults(tasks, strategies, transfer, forgetting, env)
