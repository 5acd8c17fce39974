"""One adapter format everywhere: PEFT's LoRA folder (adapter_config.json +
adapter_model.safetensors), readable by `peft.PeftModel.from_pretrained` and written by
PEFT's `save_pretrained`.

Keys are PEFT's: `base_model.model.<module path>.lora_A.weight` [r, d_in] and
`.lora_B.weight` [d_out, r], module paths relative to the model PEFT wraps. Per-module
ranks and alphas use PEFT's `rank_pattern` / `alpha_pattern`. Only safetensors are read:
a pickled `adapter_model.bin` can run code on load, so it is refused.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tasktune.errors import TasktuneError
from tasktune.lora.inject import PEFT_PREFIX, AdapterSpec, LoRAHandle, inject_lora
from tasktune.lora.layer import lora_scaling

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's get_pattern_key: the first pattern that matches the path's end wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@dataclass
class AdapterWeights:
    """A validated PEFT LoRA folder: its config and, per module path, A [r, d_in], B [d_out, r]."""

    config: dict
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    source: str = ""

    def alpha(self, path: str) -> float:
        return float(_pattern_value(self.config.get("alpha_pattern") or {}, path, self.config["lora_alpha"]))

    def rank(self, path: str) -> int:
        return self.modules[path][0].shape[0]

    def scaling(self, path: str) -> float:
        return lora_scaling(self.rank(path), self.alpha(path), bool(self.config.get("use_rslora", False)))

    @property
    def max_rank(self) -> int:
        return max(A.shape[0] for A, _ in self.modules.values())


def read_adapter(folder: str | Path) -> AdapterWeights:
    """Read and check a PEFT LoRA folder. Refuses pickles, non-LoRA and LoRA variants whose
    math differs (DoRA, bias, fan_in_fan_out), keys other than lora_A / lora_B, and shapes
    that disagree with the config's ranks."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise TasktuneError(f"{folder}: not a PEFT adapter folder (no {CONFIG_NAME})")
    if not weights_path.is_file():
        pickled = [n for n in PICKLE_NAMES if (folder / n).is_file()]
        if pickled:
            raise TasktuneError(
                f"{folder / pickled[0]}: pickled adapter weights are refused (loading a pickle can run code); "
                f"re-save it with safetensors (PEFT: save_pretrained(..., safe_serialization=True))"
            )
        raise TasktuneError(f"{folder}: no {WEIGHTS_NAME}")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    where = str(config_path)
    if config.get("peft_type") != "LORA":
        raise TasktuneError(f"{where}: peft_type is {config.get('peft_type')!r}, only LORA adapters are supported")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("lora_bias", False), ("bias", "none")):
        if config.get(key, ok) != ok:
            raise TasktuneError(f"{where}: {key}={config[key]!r} is not supported (need {ok!r})")
    if "r" not in config or "lora_alpha" not in config:
        raise TasktuneError(f"{where}: missing r or lora_alpha")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_path)).items():
        match = _KEY.match(key)
        if not match:
            raise TasktuneError(f"{weights_path}: unsupported tensor {key!r} (only lora_A / lora_B weights)")
        halves.setdefault(match["path"], {})[match["ab"]] = tensor
    if not halves:
        raise TasktuneError(f"{weights_path}: no LoRA weights")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise TasktuneError(f"{weights_path}: module {path!r} has lora_{'A' if 'A' in ab else 'B'} only")
        A, B = ab["A"], ab["B"]
        r = int(_pattern_value(config.get("rank_pattern") or {}, path, config["r"]))
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise TasktuneError(
                f"{weights_path}: module {path!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                f"do not have rank {r} from the config"
            )
        modules[path] = (A, B)
    return AdapterWeights(config, modules, str(folder))


def _adapter_config(handle: LoRAHandle, name: str, base: str, task_type: str | None) -> dict:
    """PEFT's LoraConfig fields for one adapter; per-layer ranks/alphas that differ from
    the most common one go to rank_pattern / alpha_pattern."""
    k, spec = handle.index(name), handle.specs[name]
    used = {p: layer for p, layer in handle.layers.items() if int(layer.ranks[k]) > 0}
    ranks = {p: int(layer.ranks[k]) for p, layer in used.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    scale_to_alpha = (lambda s, rk: s * rk**0.5) if spec.use_rslora else (lambda s, rk: s * rk)
    alphas = {p: round(scale_to_alpha(float(layer.scaling[k]), ranks[p]), 6) for p, layer in used.items()}
    # a bf16-cast model rounds the scaling buffer: snap values within 1% back to the spec's alpha
    alphas = {p: spec.alpha if abs(a - spec.alpha) <= 1e-2 * abs(spec.alpha) else a for p, a in alphas.items()}
    alpha = spec.alpha if spec.alpha in alphas.values() else Counter(alphas.values()).most_common(1)[0][0]
    every_layer = len(used) == len(handle.layers)
    targets = spec.target_modules if every_layer and spec.target_modules else sorted(used)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": spec.dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": spec.use_rslora,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {f"^{re.escape(p)}": rk for p, rk in ranks.items() if rk != r},
        "alpha_pattern": {f"^{re.escape(p)}": a for p, a in alphas.items() if a != alpha},
    }


def save_adapter(
    handle: LoRAHandle, name: str, out_dir: str | Path, base_model_name_or_path: str, task_type: str | None = None
) -> Path:
    """Write adapter `name` as a PEFT LoRA folder. task_type: "CAUSAL_LM" for decoders,
    "FEATURE_EXTRACTION" for encoders, None for a bare PeftModel."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _adapter_config(handle, name, base_model_name_or_path, task_type)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(handle.state_dict_for(name), str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def load_adapter_into(handle: LoRAHandle, name: str, folder: str | Path) -> AdapterWeights:
    """Load a PEFT LoRA folder into slot `name`. Layers the adapter does not target get a
    zero slot; a module the handle has no layer for, or a rank above the slot's r_max,
    is an error (inject with those targets and a large enough r)."""
    return _load_weights(handle, name, read_adapter(folder))


def _load_weights(handle: LoRAHandle, name: str, weights: AdapterWeights) -> AdapterWeights:
    folder, k = weights.source, handle.index(name)
    unknown = sorted(set(weights.modules) - set(handle.layers))
    if unknown:
        raise TasktuneError(
            f"{folder}: adapter targets module(s) this model has no LoRA layer for: {', '.join(unknown[:5])}"
            + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        )
    for path, layer in handle.layers.items():
        if path not in weights.modules:
            layer.clear_adapter(k)
            continue
        A, B = weights.modules[path]
        if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features:
            raise TasktuneError(
                f"{folder}: module {path!r} is {layer.in_features}->{layer.out_features} in this model but "
                f"{A.shape[1]}->{B.shape[0]} in the adapter (a different base model?)"
            )
        if A.shape[0] > layer.r_max:
            raise TasktuneError(f"{folder}: rank {A.shape[0]} at {path!r} exceeds the slot's r_max {layer.r_max}")
        layer.set_adapter(k, A, B, weights.scaling(path))
    c = weights.config
    handle.specs[name] = AdapterSpec(
        int(c["r"]), float(c["lora_alpha"]), float(c.get("lora_dropout") or 0.0),
        _targets(c.get("target_modules")), bool(c.get("use_rslora", False)),
    )  # fmt: skip
    return weights


def _targets(value) -> tuple[str, ...] | str:
    return value if isinstance(value, str) else tuple(sorted(value or ()))


def load_adapters(model: nn.Module, folders: dict[str, str | Path], dropout: float = 0.0) -> LoRAHandle:
    """Serving: inject one slot per named PEFT folder (targets = the union of the modules
    they adapt, r_max = their largest rank) and load each into its slot."""
    read = {name: read_adapter(folder) for name, folder in folders.items()}
    paths = sorted({p for w in read.values() for p in w.modules})
    handle = inject_lora(
        model, list(folders), dropout=dropout, target_modules=paths, ranks={n: w.max_rank for n, w in read.items()}
    )
    for name, weights in read.items():
        _load_weights(handle, name, weights)
    return handle
