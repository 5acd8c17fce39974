"""Load a Hugging Face checkpoint folder into the serving `Decoder` (safetensors only).

The checkpoint's q/k/v and gate/up weights are concatenated into the decoder's fused
`qkv_proj` and `gate_up_proj`; everything else loads under its own name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tasktune.serve.decoder import FUSED, Decoder, DecoderConfig, UnsupportedModel


def fuse_projections(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Hugging Face's q/k/v and gate/up weights (and biases) -> the fused qkv_proj and
    gate_up_proj, concatenated along the output dimension. Names that are missing stay
    missing, so load_state_dict reports them."""
    state = dict(state)
    for i in range(num_layers):
        for parent, (fused, parts) in (("self_attn", ("qkv_proj", FUSED["qkv_proj"])),
                                       ("mlp", ("gate_up_proj", FUSED["gate_up_proj"]))):
            prefix = f"model.layers.{i}.{parent}."
            for kind in ("weight", "bias"):
                keys = [f"{prefix}{p}.{kind}" for p in parts]
                if all(k in state for k in keys):
                    state[f"{prefix}{fused}.{kind}"] = torch.cat([state.pop(k) for k in keys])
    return state


def load_decoder(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Decoder:
    """A Hugging Face folder (config.json + *.safetensors) -> Decoder on `device` in `dtype`
    (default: float32 on CPU, bfloat16 on GPU)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UnsupportedModel(f"{folder}: no config.json; expected a Hugging Face model folder")
    cfg = DecoderConfig.from_dict(json.loads((folder / "config.json").read_text()))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (pickle .bin weights are refused; convert them to safetensors)" if list(folder.glob("*.bin")) else ""
        raise UnsupportedModel(f"{folder}: no *.safetensors weights{hint}")
    device = torch.device(device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f, device="cpu"))
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    state = fuse_projections(state, cfg.num_layers)
    with torch.device("meta"):
        model = Decoder(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise UnsupportedModel(f"{folder}: weights do not match a {cfg.model_type} decoder: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(device=device, dtype=dtype).eval()
    model.attention_kernel = device.type == "cuda" and model.can_use_attention_kernel()
    # the fused linears need the attention kernel's decode layout, and run half-precision weights
    # only (an fp32 tl.dot is TF32 on a GPU: less precise than the fp32 cuBLAS path it replaces)
    model.linear_kernel = model.attention_kernel and model.lm_head.weight.dtype in (torch.bfloat16, torch.float16)
    return model
