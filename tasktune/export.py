"""`tasktune export`: hand a run's adapters to other servers.

- peft: one PEFT folder per adapter (adapter_config.json + adapter_model.safetensors),
  loadable by vLLM, TGI, LoRAX and `peft.PeftModel.from_pretrained`; encoder heads beside.
- merged: one full Hugging Face model folder per adapter with W + scale * B @ A folded
  into the base weights, for servers without LoRA support.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tasktune.errors import TasktuneError
from tasktune.lora.merge import merged_state_dict
from tasktune.model.restore import read_run, restore_runner


def export_run(run_dir: Path, out: Path, fmt: str = "peft") -> list[Path]:
    run_dir, out = Path(run_dir), Path(out)
    _, record = read_run(run_dir)
    if record["strategy"] == "full":
        raise TasktuneError(f"{run_dir}: a `full` run already is a plain model folder: {run_dir / 'model'}")
    adapters = sorted(p for p in (run_dir / "adapters").iterdir() if p.is_dir())
    written: list[Path] = []
    if fmt == "peft":
        for folder in adapters:
            shutil.copytree(folder, out / folder.name, dirs_exist_ok=True)
            written.append(out / folder.name)
    elif fmt == "merged":
        runner = restore_runner(run_dir)
        for folder in adapters:
            state = merged_state_dict(runner.model, runner.handle, folder.name)
            target = out / folder.name
            _save_merged(runner, state, target)
            written.append(target)
    else:
        raise TasktuneError(f"unknown export format '{fmt}'; choose peft or merged")
    if (run_dir / "heads").is_dir():
        shutil.copytree(run_dir / "heads", out / "heads", dirs_exist_ok=True)
    return written


def _save_merged(runner, state: dict, target: Path) -> None:
    """A fresh copy of the base architecture with the merged weights, saved as safetensors."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if runner.family == "causal" else AutoModel
    model = auto.from_config(runner.model.config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m and "position_ids" not in m]:
        raise TasktuneError(f"merged weights do not match the base architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.save_pretrained(target, safe_serialization=True)
    runner.tokenizer.save_pretrained(target)
