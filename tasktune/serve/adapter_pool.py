"""Many PEFT LoRA adapters over one served base: validated on disk, paged disk -> CPU -> device.

Registering an adapter reads only its adapter_config.json and its safetensors header
(names and shapes), so thousands can be registered cheaply and every mistake is reported
at once. Weights are read on first use. On the device, up to `max_resident` adapters
live in one stacked buffer per (layer, module): A [max_resident, max_rank, d_in] and
B [max_resident, d_out, max_rank], ranks zero-padded to max_rank; an adapter's id is
its slot there. Running sequences pin their adapter; the least recently used unpinned
one is evicted (its weights stay in a bounded CPU cache) when a slot is needed.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tasktune.errors import TasktuneError
from tasktune.lora import triton_ops
from tasktune.serve.decoder_lora import LoraStacks

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
KEY_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class AdapterError(TasktuneError):
    """Base of adapter-pool errors; `status` is the HTTP status the API answers with."""

    status = 400


class InvalidAdapterName(AdapterError):
    status = 400


class AdapterPathError(AdapterError):
    status = 400


class AdapterNotFound(AdapterError):
    status = 404


class InvalidAdapter(AdapterError):
    status = 422


class AdapterExists(AdapterError):
    status = 409


class AdapterBusy(AdapterError):
    status = 409


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    rank: int
    scaling: float
    modules: tuple[str, ...]
    base_model: str | None


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise InvalidAdapterName(f"invalid adapter name {name!r}: use 1-128 characters from [A-Za-z0-9._-]")
    return name


def stack_storage(num_layers: int, shapes: dict[str, tuple[int, int]], groups: dict[str, tuple[str, ...]],
                  slots: int, rank: int, device: torch.device, dtype: torch.dtype):
    """Zeroed stacks for every (layer, module): A [slots, rank, d_in], B [slots, d_out, rank].
    The modules of a group (sharing d_in) are views into one A [slots, M * rank, d_in] and
    one B [slots, sum of d_out, rank], returned too: (per module, per group). (B stored
    rank-major made the BGMV expand 15% slower a step on an H200, and the fused linear's
    LoRA path, which it was for, was slower still: kept d_out-major.)"""
    weights, fused = {}, {}
    zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
    for layer in range(num_layers):
        grouped = set()
        for name, modules in groups.items():
            if not all(m in shapes for m in modules) or len({shapes[m][0] for m in modules}) != 1:
                continue
            A = zeros(slots, len(modules) * rank, shapes[modules[0]][0])
            B = zeros(slots, sum(shapes[m][1] for m in modules), rank)
            start = 0
            for i, m in enumerate(modules):
                weights[(layer, m)] = (A[:, i * rank:(i + 1) * rank], B[:, start:start + shapes[m][1]])
                start += shapes[m][1]
            fused[(layer, name)] = (A, B)
            grouped.update(modules)
        for m, (d_in, d_out) in shapes.items():
            if m not in grouped:
                weights[(layer, m)] = (zeros(slots, rank, d_in), zeros(slots, d_out, rank))
    return weights, fused


class AdapterPool:
    def __init__(
        self,
        *,
        num_layers: int,
        shapes: dict[str, tuple[int, int]],
        base_name: str,
        base_path: str | Path | None = None,
        root: str | Path | None = None,
        max_resident: int = 8,
        max_rank: int = 16,
        max_cpu: int = 64,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        lora_kernels: bool = True,
        groups: dict[str, tuple[str, ...]] | None = None,
    ):
        """root: the only folder adapters may be loaded from (None: any path; trusted callers only).
        lora_kernels: decode with the Triton kernels where they can run (a GPU with Triton).
        groups: fused linear -> the modules it holds (decoder.FUSED); their stacks share one
        tensor, so one kernel launch pair serves the whole fused linear."""
        self.num_layers, self.shapes, self.base_name = num_layers, shapes, base_name
        self.base_path = Path(base_path).resolve() if base_path else None
        self.root = Path(root).resolve() if root else None
        self.max_resident, self.max_rank, self.max_cpu = max_resident, max_rank, max_cpu
        self.device, self.dtype = torch.device(device), dtype
        self.stacks = LoraStacks(*stack_storage(num_layers, shapes, groups or {}, max_resident, max_rank,
                                                self.device, dtype),
                                 scaling=torch.zeros(max_resident, device=self.device, dtype=torch.float32),
                                 kernels=lora_kernels and self.device.type == "cuda" and triton_ops.available(self.device)
                                 and max_rank <= triton_ops.MAX_RANK)
        self._adapters: dict[str, AdapterInfo] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # LRU order, most recent last
        self._refs: dict[str, int] = {}
        self._cpu: OrderedDict[str, dict] = OrderedDict()
        self._free = list(range(max_resident - 1, -1, -1))
        self._lock = threading.RLock()
        self.loads = 0  # disk reads, for tests and metrics

    # registry
    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def names(self) -> list[str]:
        return sorted(self._adapters)

    def info(self, name: str) -> AdapterInfo:
        try:
            return self._adapters[name]
        except KeyError:
            raise AdapterNotFound(f"adapter {name!r} is not registered") from None

    def resident(self) -> list[str]:
        return list(self._resident)

    def register(self, name: str, path: str | Path) -> AdapterInfo:
        """Validate a PEFT LoRA folder and register it under `name` (no weights read)."""
        check_name(name)
        if name == self.base_name:
            raise AdapterExists(f"{name!r} is the base model's name")
        folder = self._resolve(path)
        info = self._validate(name, folder)
        with self._lock:
            if name in self._adapters:
                raise AdapterExists(f"adapter {name!r} is already registered; unload it first")
            self._adapters[name] = info
        return info

    def register_root(self) -> list[str]:
        """Register every adapter folder directly under the root, named after its folder."""
        if self.root is None:
            raise AdapterPathError("no adapter root configured")
        return [self.register(d.name, d).name for d in sorted(self.root.iterdir()) if (d / CONFIG).is_file()]

    def unregister(self, name: str) -> None:
        with self._lock:
            self.info(name)
            if self._refs.get(name, 0):
                raise AdapterBusy(f"adapter {name!r} is serving running requests; retry when they finish")
            slot = self._resident.pop(name, None)
            if slot is not None:
                self._free.append(slot)
            self._cpu.pop(name, None)
            del self._adapters[name]

    # residency
    def acquire(self, name: str) -> int | None:
        """Pin `name` on the device and return its slot; None when every slot is pinned."""
        with self._lock:
            info = self.info(name)
            if name in self._resident:
                self._resident.move_to_end(name)
                self._refs[name] += 1
                return self._resident[name]
            if not self._free:
                victim = next((n for n in self._resident if not self._refs.get(n)), None)
                if victim is None:
                    return None
                self._free.append(self._resident.pop(victim))
                self._refs.pop(victim, None)
            weights = self._cpu_weights(info)
            slot = self._free.pop()
            self._write_slot(slot, info, weights)
            self._resident[name], self._refs[name] = slot, 1
            return slot

    def release(self, name: str) -> None:
        with self._lock:
            if self._refs.get(name, 0) > 0:
                self._refs[name] -= 1

    def _cpu_weights(self, info: AdapterInfo) -> dict:
        if info.name in self._cpu:
            self._cpu.move_to_end(info.name)
            return self._cpu[info.name]
        try:
            raw = load_file(info.path / WEIGHTS, device="cpu")
        except Exception as e:  # a file changed or corrupted since registration
            raise InvalidAdapter(f"adapter {info.name!r}: cannot read {WEIGHTS}: {e}") from None
        weights: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, t in raw.items():
            m = KEY_RE.search(key)
            if m is None:
                raise InvalidAdapter(f"adapter {info.name!r}: unexpected tensor {key!r}")
            if not bool(torch.isfinite(t).all()):  # batched with other tenants' rows: refuse, never mix it in
                raise InvalidAdapter(f"adapter {info.name!r}: tensor {key!r} in {WEIGHTS} has NaN or infinite values")
            weights.setdefault((int(m[1]), m[2]), {})[m[3]] = t.to(self.dtype)
        self.loads += 1
        self._cpu[info.name] = weights
        while len(self._cpu) > self.max_cpu:
            self._cpu.popitem(last=False)
        return weights

    def _write_slot(self, slot: int, info: AdapterInfo, weights: dict) -> None:
        r = info.rank
        for key, (A, B) in self.stacks.weights.items():
            A[slot].zero_()
            B[slot].zero_()
            ab = weights.get(key)
            if ab is not None:
                A[slot, :r].copy_(ab["A"])
                B[slot, :, :r].copy_(ab["B"])
        self.stacks.scaling[slot] = info.scaling

    # validation
    def _resolve(self, path: str | Path) -> Path:
        try:
            p = Path(path)
            if self.root is not None and not p.is_absolute():
                p = self.root / p
            folder = p.resolve(strict=True)
        except (OSError, RuntimeError, ValueError, TypeError):  # ValueError: a NUL byte in the path
            raise AdapterPathError(f"adapter folder {str(path)!r} does not exist") from None
        if self.root is not None and not folder.is_relative_to(self.root):
            raise AdapterPathError(f"adapter folder {str(path)!r} is outside the adapter root")
        if not folder.is_dir():
            raise AdapterPathError(f"{str(path)!r} is not a folder")
        return folder

    def _validate(self, name: str, folder: Path) -> AdapterInfo:
        bad = lambda msg: InvalidAdapter(f"adapter {name!r} ({folder}): {msg}")  # noqa: E731
        weights = folder / WEIGHTS
        if not weights.is_file():
            if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
                raise bad(f"pickle weights (.bin/.pt) are refused; save the adapter as {WEIGHTS}")
            raise bad(f"missing {WEIGHTS}")
        if not (folder / CONFIG).is_file():
            raise bad(f"missing {CONFIG}")
        for f in (weights, folder / CONFIG):
            if self.root is not None and not f.resolve().is_relative_to(self.root):
                raise AdapterPathError(f"adapter {name!r}: {f.name} links outside the adapter root")
        try:
            cfg = json.loads((folder / CONFIG).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"{CONFIG} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict) or str(cfg.get("peft_type", "")).upper() != "LORA":
            raise bad("not a LoRA adapter (peft_type must be LORA)")
        rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise bad(f"rank r={rank!r} must be a positive integer")
        if rank > self.max_rank:
            raise bad(f"rank {rank} is above the pool's max_rank {self.max_rank}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise bad(f"lora_alpha={alpha!r} must be a number")
        for key, ok in (("use_dora", lambda v: not v), ("rank_pattern", lambda v: not v),
                        ("alpha_pattern", lambda v: not v), ("layers_to_transform", lambda v: v is None),
                        ("modules_to_save", lambda v: not v), ("bias", lambda v: v in (None, "none")),
                        ("fan_in_fan_out", lambda v: not v)):
            if not ok(cfg.get(key)):
                raise bad(f"{key}={cfg.get(key)!r} is not supported by the serving engine")
        targets = cfg.get("target_modules")
        if targets == "all-linear":
            targets = list(self.shapes)
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise bad(f"target_modules={targets!r} must be a list of module names")
        unknown = sorted(set(targets) - set(self.shapes))
        if unknown:
            raise bad(f"target modules {unknown} do not exist in the base (adaptable: {sorted(self.shapes)})")
        base = cfg.get("base_model_name_or_path")
        if base and not self._same_base(str(base)):
            raise bad(f"trained for base {base!r}, but this server serves {self.base_name!r}")
        self._check_tensors(bad, weights, rank, set(targets))
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        return AdapterInfo(name, folder, rank, float(scale), tuple(sorted(targets)), base)

    def _same_base(self, base: str) -> bool:
        if base == self.base_name or Path(base).name == self.base_name:
            return True
        try:
            return self.base_path is not None and Path(base).resolve() == self.base_path
        except (OSError, RuntimeError, ValueError):
            return False

    def _check_tensors(self, bad, weights: Path, rank: int, targets: set[str]) -> None:
        try:
            with safe_open(str(weights), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise bad(f"{WEIGHTS} is not a valid safetensors file: {e}") from None
        seen = set()
        for key, shape in shapes.items():
            m = KEY_RE.search(key)
            if m is None:
                raise bad(f"unexpected tensor {key!r} (only lora_A/lora_B weights of decoder layers are served)")
            layer, module, ab = int(m[1]), m[2], m[3]
            if layer >= self.num_layers or module not in targets:
                raise bad(f"tensor {key!r} targets a layer/module outside the config or the base")
            d_in, d_out = self.shapes[module]
            want = (rank, d_in) if ab == "A" else (d_out, rank)
            if shape != want:
                raise bad(f"tensor {key!r} has shape {list(shape)}, expected {list(want)}")
            seen.add((layer, module, ab))
        missing = [(l, m, ab) for l in range(self.num_layers) for m in targets for ab in "AB" if (l, m, ab) not in seen]
        if missing:
            l, m, ab = missing[0]
            raise bad(f"{len(missing)} tensor(s) missing, e.g. layers.{l}.{m}.lora_{ab}.weight")
