"""Tiny projects for end-to-end tests: a user classification task from the example jsonl
files plus a small slice of the real SNIPS slots data, on a tiny model folder."""

from __future__ import annotations

from pathlib import Path

import yaml

from tasktune.config import ProjectConfig, load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "my_task"


def tiny_project(tmp: Path, model_dir: Path, *, lora: dict | None = None, **train) -> Path:
    """Write a project YAML into tmp and return its path; `lora` updates the LoRA
    settings, the other keywords the train settings."""
    settings = {"batch_size": 8, "max_steps": 6, "log_every": 1, "lr": 5e-3}
    settings.update(train)
    raw = {
        "model": str(model_dir),
        "seed": 0,
        "max_length": 384,
        "tasks": [
            {
                "name": "home_intent", "kind": "classification", "input": "text", "target": "intent",
                "path": str(EXAMPLES / "train.jsonl"), "validation_path": str(EXAMPLES / "validation.jsonl"),
                "eval_path": str(EXAMPLES / "test.jsonl"),
            },
            {"builtin": "snips_slots", "max_examples": {"train": 40, "validation": 10, "test": 12}},
        ],
        "mixing": {"policy": "uniform"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, **(lora or {})},
        "train": settings,
    }
    path = Path(tmp) / "project.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny_config(tmp: Path, model_dir: Path, **train) -> ProjectConfig:
    return load_config(tiny_project(tmp, model_dir, **train))
