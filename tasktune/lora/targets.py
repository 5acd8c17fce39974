"""Which linear layers of a model get adapters.

Targets are matched the way PEFT matches a list of `target_modules`: a module path is
targeted when it equals a target or ends with `.<target>` (so `output.dense` matches both
`attention.output.dense` and the feed-forward `output.dense` of a BERT layer, but not
`pooler.dense`). A string target is a regex matched against the whole path, and
"all-linear" means every linear layer except the output projection (PEFT's shorthand).
Only `nn.Linear` modules are adapted.
"""

from __future__ import annotations

import re

from torch import nn

from tasktune.errors import TasktuneError

_DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_BERT = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]

# model_type (from the HF config) -> every attention and feed-forward linear.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "mistral": _DECODER,
    "bert": _BERT,
}


def linear_paths(model: nn.Module) -> list[str]:
    """Module paths of every nn.Linear in the model, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name]


def _generic(path: str) -> str:
    """`encoder.layer.0.attention.output.dense` -> `attention.output.dense`: the part after
    the layer index, which is what a user would write as a target."""
    parts = path.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[-1] + 1 :]) if digits else path


def candidate_targets(model: nn.Module) -> list[str]:
    """The distinct target names a user could write, for error messages."""
    return sorted({_generic(p) for p in linear_paths(model)})


def default_targets(model: nn.Module) -> list[str]:
    """The family's attention and feed-forward projections, from `model.config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise TasktuneError(
            f"no default LoRA targets for model type {model_type!r}; set lora.target_modules to some of: "
            + ", ".join(candidate_targets(model))
        )
    return list(DEFAULT_TARGETS[model_type])


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def _output_layer_paths(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return {name for name, module in model.named_modules() if out is not None and module is out}


def match_targets(model: nn.Module, target_modules: list[str] | str | None) -> list[str]:
    """Module paths of the linear layers to adapt. Every listed target must match at least
    one linear layer; a target that matches nothing is the user's typo, so we say which
    one and list what would have matched."""
    if target_modules is None:
        target_modules = default_targets(model)
    linears = linear_paths(model)
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            skip = _output_layer_paths(model)
            paths = [p for p in linears if p not in skip]
        else:
            paths = [p for p in linears if re.fullmatch(target_modules, p)]
        if not paths:
            raise TasktuneError(
                f"LoRA target {target_modules!r} matches no linear layer; candidates: "
                + ", ".join(candidate_targets(model))
            )
        return paths
    missing = [t for t in target_modules if not any(_matches(p, t) for p in linears)]
    if missing:
        others = [name for name, _ in model.named_modules() if name and any(_matches(name, t) for t in missing)]
        why = f" (it names non-linear modules such as {others[0]!r})" if others else ""
        raise TasktuneError(
            f"LoRA target(s) {', '.join(repr(t) for t in missing)} match no linear layer{why}; candidates: "
            + ", ".join(candidate_targets(model))
        )
    return [p for p in linears if any(_matches(p, t) for t in target_modules)]
