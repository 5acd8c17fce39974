"""Fold a task's CGC-LoRA mixture into one plain LoRA adapter for serving.

With a task-id gate the gate weights g_{t,e} are constants at inference, so task t's
update is one LoRA whose rank is the sum of the ranks of the experts it mixes (E_t =
the common experts + t's own, in gate order):

    scaling * sum_e g_{t,e} B_e A_e = scaling * B_fold @ A_fold
    A_fold = concat_e(A_e)           [sum r_e, d_in]   (stacked rows)
    B_fold = concat_e(g_{t,e} B_e)   [d_out, sum r_e]  (stacked columns)

The folded adapter is a PEFT LoRA folder like peft_io.save_adapter writes, so a `cgc` run
serves, exports and reloads exactly as a `single` run does. PEFT scales by
lora_alpha / r with r = sum r_e (rslora off), so lora_alpha = scaling * r_fold; with the
default ranks r_fold is the plain-LoRA rank r and lora_alpha is the configured alpha.
An input-gated CGC mixes differently per token and has no fold: it raises.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tasktune.errors import TasktuneError
from tasktune.lora.cgc import CGCHandle, CGCLoRALinear
from tasktune.lora.inject import PEFT_PREFIX
from tasktune.lora.peft_io import CONFIG_NAME, WEIGHTS_NAME


@torch.no_grad()
def fold_layer(layer: CGCLoRALinear, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Task index k of one layer -> A_fold [K*r_e, d_in], B_fold [d_out, K*r_e] (K = k_c + k_s),
    detached contiguous copies in the adapters' dtype; gates computed in fp32."""
    if layer.input_gate:
        raise TasktuneError(
            "an input-gated CGC layer mixes its experts differently for every token, so it cannot be folded "
            "into one LoRA adapter; serve it as CGC, or train with the task gate (input_gate=False)"
        )
    experts = layer.allowed[k]  # [K] expert slots of task k, in gate order
    g = layer.task_gates()[k]  # [K]
    K, r = experts.numel(), layer.expert_rank
    A = layer.lora_A[experts].reshape(K * r, layer.in_features)  # [K*r, d_in]
    B = (layer.lora_B[experts].float() * g.view(K, 1, 1)).to(layer.lora_B.dtype)  # [K, d_out, r]
    B = B.permute(1, 0, 2).reshape(layer.out_features, K * r)  # [d_out, K*r]
    return A.clone().contiguous(), B.contiguous()


def fold_task(handle: CGCHandle, task: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A_fold [r_fold, d_in], B_fold [d_out, r_fold])} for one task."""
    k = handle.index(task)
    return {path: fold_layer(layer, k) for path, layer in handle.layers.items()}


def folded_config(handle: CGCHandle, base_model_name_or_path: str, task_type: str | None) -> dict:
    """PEFT's LoraConfig for a folded adapter: one rank everywhere, alpha chosen so that
    PEFT's alpha / r equals the CGC scaling."""
    spec = handle.spec
    r_fold = spec.task_rank
    targets = spec.target_modules if spec.target_modules else sorted(handle.layers)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r_fold,
        "lora_alpha": spec.scaling * r_fold,
        "lora_dropout": spec.dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_folded_adapter(
    handle: CGCHandle, task: str, out_dir: str | Path, base_model_name_or_path: str, task_type: str | None = None
) -> Path:
    """Write task `task`'s folded adapter as a PEFT LoRA folder (adapter_config.json +
    adapter_model.safetensors, peft_io's key format). task_type: "CAUSAL_LM" for
    decoders, "FEATURE_EXTRACTION" for encoders, None for a bare PeftModel."""
    state: dict[str, torch.Tensor] = {}
    for path, (A, B) in fold_task(handle, task).items():
        state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A
        state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = folded_config(handle, base_model_name_or_path, task_type)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out
