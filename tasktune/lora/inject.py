"""Model surgery: put many LoRA adapters into a model, and choose them per forward.

`inject_lora` swaps every targeted `nn.Linear` for a `MultiLoRALinear` in place and
freezes the rest of the model (as PEFT does); all swapped layers share one
`AdapterRouting`. The returned `LoRAHandle` is how the rest of tasktune talks about
adapters: by name. It knows which slot a name lives in, where the layers are, and how
to cut one adapter out of the stacks in PEFT's key format.

Module paths are relative to the model passed in. Pass the same object PEFT would wrap
(e.g. the `LlamaForCausalLM`, not its inner `LlamaModel`) so saved keys match PEFT's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tasktune.errors import TasktuneError
from tasktune.lora.layer import AdapterRouting, MultiLoRALinear, lora_scaling, routing_ids
from tasktune.lora.targets import default_targets, match_targets

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterSpec:
    """What one adapter was created with (PEFT's LoraConfig fields that matter here)."""

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ()
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)


@dataclass
class LoRAHandle:
    """Adapters of one model by name. names: name -> slot; layers: module path -> layer."""

    names: dict[str, int]
    layers: dict[str, MultiLoRALinear]
    routing: AdapterRouting
    specs: dict[str, AdapterSpec] = field(default_factory=dict)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise TasktuneError(f"unknown adapter {name!r}; known adapters: {', '.join(self.names)}")
        return self.names[name]

    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).lora_A.device

    def parameters(self, name: str | None = None) -> list[torch.Tensor]:
        """name=None: every stacked LoRA Parameter (lora_A, lora_B of each layer): what the
        optimizer gets. With a name: that adapter's unpadded slices of them, as views that
        stay in the autograd graph (for norms or penalties; an optimizer needs leaves)."""
        if name is None:
            return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]
        k = self.index(name)
        out: list[torch.Tensor] = []
        for layer in self.layers.values():
            r = int(layer.ranks[k])
            if r:
                out += [layer.lora_A[k, :r], layer.lora_B[k, :, :r]]
        return out

    def grads(self, name: str) -> list[torch.Tensor]:
        """That adapter's gradient slices (zeros where no gradient was accumulated)."""
        k = self.index(name)
        out = []
        for layer in self.layers.values():
            for p in (layer.lora_A, layer.lora_B):
                out.append(p.grad[k] if p.grad is not None else torch.zeros_like(p[k]))
        return out

    def trainable_parameter_count(self, name: str) -> int:
        """What PEFT's print_trainable_parameters reports for this adapter alone."""
        k = self.index(name)
        return sum(int(layer.ranks[k]) * (layer.in_features + layer.out_features) for layer in self.layers.values())

    def state_dict_for(self, name: str) -> dict[str, torch.Tensor]:
        """One adapter in PEFT's saved key format: `base_model.model.<path>.lora_A.weight`
        [r, d_in] and `.lora_B.weight` [d_out, r], unpadded, contiguous copies."""
        k = self.index(name)
        out: dict[str, torch.Tensor] = {}
        for path, layer in self.layers.items():
            if int(layer.ranks[k]) == 0:  # this adapter does not adapt this layer
                continue
            A, B = layer.adapter_weights(k)
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A.clone().contiguous()
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B.clone().contiguous()
        return out

    def ids_tensor(self, ids: int | str | None | Sequence | torch.Tensor) -> torch.Tensor | None:
        """Adapter choice -> LongTensor on the adapters' device (see `routing_ids`)."""
        return routing_ids(ids, self.index, len(self.names), self.device, "adapter slot")


def inject_lora(
    model: nn.Module,
    adapter_names: list[str],
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
    ranks: dict[str, int] | None = None,
    alphas: dict[str, float] | None = None,
    use_rslora: bool = False,
    init_b: str = "zeros",
) -> LoRAHandle:
    """Replace each targeted nn.Linear by a MultiLoRALinear holding one slot per name (in
    the given order), freeze every other parameter of the model, and return the handle.
    `ranks` / `alphas` override r / alpha per adapter; the stacks are padded to the
    largest rank. Initialisation draws from torch's global RNG: seed before calling."""
    if not adapter_names or len(set(adapter_names)) != len(adapter_names):
        raise TasktuneError(f"adapter names must be non-empty and distinct, got {adapter_names}")
    if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        raise TasktuneError("this model already has LoRA layers; inject once with every adapter name")
    ranks, alphas = ranks or {}, alphas or {}
    unknown = (set(ranks) | set(alphas)) - set(adapter_names)
    if unknown:
        raise TasktuneError(f"ranks/alphas given for unknown adapter(s): {', '.join(sorted(unknown))}")
    paths = match_targets(model, target_modules)
    targets = tuple(target_modules) if isinstance(target_modules, list) else target_modules
    if targets is None:
        targets = tuple(dict.fromkeys(_leaf_targets(paths, model)))
    specs = {
        n: AdapterSpec(ranks.get(n, r), alphas.get(n, alpha), dropout, targets, use_rslora) for n in adapter_names
    }
    if any(s.r <= 0 for s in specs.values()):
        raise TasktuneError("LoRA ranks must be positive")
    model.requires_grad_(False)
    routing = AdapterRouting()
    layers: dict[str, MultiLoRALinear] = {}
    for path in paths:
        base = model.get_submodule(path)
        wrapped = MultiLoRALinear(
            base, routing, [s.r for s in specs.values()], [s.scaling for s in specs.values()], dropout
        )
        for k in range(len(adapter_names)):
            wrapped.reset_adapter(k, init_b)
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, wrapped)
        layers[path] = wrapped
    return LoRAHandle({n: i for i, n in enumerate(adapter_names)}, layers, routing, specs)


def _leaf_targets(paths: list[str], model: nn.Module) -> list[str]:
    """The default target names that matched, for the saved adapter_config."""
    return [t for t in default_targets(model) if any(p == t or p.endswith("." + t) for p in paths)]


@contextmanager
def use_adapters(handle: LoRAHandle, ids: int | str | None | Sequence | torch.Tensor) -> Iterator[None]:
    """Route the forwards inside the block: ids per row [B], per token [B, T], or one
    adapter (slot or name) for everything; -1 / None = base model. Restores the previous
    routing on exit, so blocks nest. `handle` is a LoRAHandle or a CGCHandle. Ids given
    as a CPU tensor reach the device without a wait, and the layers plan from that host
    copy instead of reading the device."""
    routing = handle.routing
    previous = routing.ids, routing.host_copy()
    host = ids.long() if isinstance(ids, torch.Tensor) and ids.device.type == "cpu" else None
    routing.set(handle.ids_tensor(ids), host)
    try:
        yield
    finally:
        routing.set(*previous)
