"""Fold one adapter into the base weights: W' = W + scaling * B @ A (`export --format merged`).

The merged model is an ordinary Hugging Face model again: same module names, same state
dict keys, no LoRA layers, so `save_pretrained` writes a folder any HF loader reads.
Merging is done in float32 (or the adapter dtype if wider) and cast back to the base
weight's dtype, so a bf16 base gets one rounding, not two.
"""

from __future__ import annotations

import torch
from torch import nn

from tasktune.lora.inject import LoRAHandle


def _merged_weight(layer, k: int) -> torch.Tensor:
    # W: [d_out, d_in] + scaling * B [d_out, r] @ A [r, d_in]
    weight = layer.base_layer.weight
    dtype = torch.promote_types(layer.lora_A.dtype, torch.float32)
    merged = weight.detach().to(dtype) + layer.delta_weight(k).to(dtype)
    return merged.to(weight.dtype)


def merged_state_dict(model: nn.Module, handle: LoRAHandle, name: str) -> dict[str, torch.Tensor]:
    """The model's state dict as the plain base model names it (`<path>.weight`, not
    `<path>.base_layer.weight`, no LoRA tensors), with adapter `name` folded in.
    The model itself is not changed."""
    k = handle.index(name)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        path = next((p for p in handle.layers if key.startswith(p + ".")), None)
        if path is None:
            out[key] = value
            continue
        rest = key[len(path) + 1 :]
        if not rest.startswith("base_layer."):
            continue  # lora_A, lora_B, ranks, scaling
        param = rest[len("base_layer.") :]
        layer = handle.layers[path]
        out[f"{path}.{param}"] = _merged_weight(layer, k) if param == "weight" else value
    return out


@torch.no_grad()
def merge_into_base(model: nn.Module, handle: LoRAHandle, name: str) -> nn.Module:
    """Fold adapter `name` into each base weight and put the plain nn.Linear back in place
    of every LoRA layer. The handle is unusable afterwards. Returns the model."""
    k = handle.index(name)
    for path, layer in handle.layers.items():
        base = layer.base_layer
        base.weight.copy_(_merged_weight(layer, k))
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, base)
    handle.layers.clear()
    return model
