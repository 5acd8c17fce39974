"""`tasktune compare` end to end on a tiny encoder: every strategy trained and scored on
the same test sets, the three report files written, every metric with its CI."""

from __future__ import annotations

import json

from rich.console import Console

from projects import tiny_config
from tasktune.compare import run_compare


def test_compare_writes_report_with_cis_for_every_strategy_and_task(tmp_path, tiny_bert):
    cfg = tiny_config(tmp_path, tiny_bert, max_steps=4, eval_every=2)
    console = Console(record=True, width=160)
    run_compare(cfg, ["single", "multi"], tmp_path / "cmp", console=console, n_resamples=200)
    report = tmp_path / "cmp" / "report"
    for name in ("index.html", "results.json", "summary.md"):
        assert (report / name).stat().st_size > 0
    results = json.loads((report / "results.json").read_text())
    assert set(results["strategies"]) == {"single", "multi"}
    for strategy in results["strategies"].values():
        assert set(strategy["tasks"]) == {"home_intent", "snips_slots"}
        for task in strategy["tasks"].values():
            for metric in task["metrics"].values():
                if metric["value"] is not None:
                    assert metric["ci_low"] <= metric["value"] <= metric["ci_high"]
        assert strategy["costs"]["trainable_params"] > 0 and strategy["costs"]["train_seconds"] > 0
    # the shared adapter has fewer trainable parameters than one adapter per task
    assert results["strategies"]["multi"]["costs"]["trainable_params"] < results["strategies"]["single"]["costs"]["trainable_params"]
    assert results["transfer"]["tasks"] == ["home_intent", "snips_slots"]
    assert {f["strategy"] for f in results["forgetting"]} == {"single", "multi"}
    printed = console.export_text()
    assert "home_intent" in printed and "report" in printed


def test_full_fine_tuning_is_compared_and_its_forgetting_measured(tmp_path, tiny_bert):
    cfg = tiny_config(tmp_path, tiny_bert, max_steps=3, full_lr=1e-3)
    results = run_compare(cfg, ["single", "full"], tmp_path / "cmp", console=Console(width=160), n_resamples=100)
    full = results.strategies["full"]
    assert full.costs.trainable_params > results.strategies["single"].costs.trainable_params
    drift = [f for f in results.forgetting if f.strategy == "full"]
    assert len(drift) == 1 and drift[0].after < 1.0  # the tuned encoder's embeddings moved
    assert (tmp_path / "cmp" / "full" / "model" / "config.json").exists()


def test_compare_ranks_single_multi_cgc_and_grouped(tmp_path, tiny_bert):
    cfg = tiny_config(tmp_path, tiny_bert, max_steps=3)
    results = run_compare(cfg, ["grouped", "single", "multi", "cgc"], tmp_path / "cmp", console=Console(width=160), n_resamples=100)
    assert set(results.strategies) == {"single", "multi", "cgc", "grouped"}
    groups = results.strategies["grouped"].notes["groups"]
    assert sorted(t for g in groups for t in g) == ["home_intent", "snips_slots"]
    gates = results.strategies["cgc"].notes["cgc_gates"]["gates"]
    some_layer = next(iter(gates.values()))
    assert abs(sum(some_layer["home_intent"]) - 1.0) < 1e-5
    # the folded cgc adapters are plain PEFT folders, one per task
    for task in ("home_intent", "snips_slots"):
        assert (tmp_path / "cmp" / "cgc" / "adapters" / task / "adapter_model.safetensors").exists()
    ranking = json.loads((tmp_path / "cmp" / "report" / "results.json").read_text())
    assert set(ranking["strategies"]) == {"single", "multi", "cgc", "grouped"}
