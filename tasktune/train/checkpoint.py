"""Training checkpoints: atomic, safetensors-only, and exact enough to resume bitwise.

Layout of `dir/checkpoint-{step}/`:

    tensors.safetensors   the caller's tensors (adapter weights, heads), names as given
    state.safetensors     every other tensor: optimizer state (exp_avg, exp_avg_sq, step),
                          scheduler tensors if any, RNG states ("rng.torch_cpu", ...)
    state.json            step, the caller's `extra`, and the non-tensor skeletons of the
                          optimizer / scheduler / RNG states with {"__tensor__": name}
                          placeholders pointing into state.safetensors

Nothing is pickled and nothing is read with `torch.load`, so loading a checkpoint cannot
run code. Python values JSON cannot hold as such are tagged: a tuple becomes
{"__tuple__": [...]} (Adam's betas), a dict with non-string keys {"__items__": [[k, v]...]}
(the optimizer's per-parameter state is keyed by int).

Atomicity: everything is written into a hidden sibling folder `.tmp-checkpoint-{step}-*`,
each file and the folder are fsynced, and only then is the folder renamed to its final
name (rename is atomic on POSIX filesystems). A crash mid-write leaves only a hidden
temporary folder, which `latest_checkpoint` never picks; an exception cleans it up.
Old checkpoints are pruned by renaming them hidden before deleting them, so a
half-deleted checkpoint is never visible either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tasktune.errors import TasktuneError
from tasktune.train.rng import RngState, capture_rng_state, restore_rng_state

FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
STATE_TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class LoadedCheckpoint:
    """What `load_checkpoint` hands back; optimizer/scheduler/RNG are restored in place."""

    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- encoding state dicts


def _encode(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-safe skeleton of `obj`; its tensors are moved into `tensors` under `name.*`."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        # A private contiguous CPU copy: safetensors refuses tensors that share storage.
        tensors[name] = t.cpu().contiguous() if t.device.type != "cpu" else t.contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{name}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, name, {}), _encode(v, f"{name}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at '{name}' in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `_encode`."""
    if isinstance(obj, dict):
        if obj.keys() == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if obj.keys() == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if obj.keys() == {"__items__"}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


# ---------------------------------------------------------------- durable file system ops


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_hidden(path: Path) -> None:
    """Delete a checkpoint folder so that it disappears at once: rename first, then delete."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------- public API


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint with the highest step in `directory`, or None. Temporary folders of
    interrupted writes are hidden (`.tmp-...`) and never returned."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(
    directory: str | Path,
    step: int,
    *,
    tensors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
    rng: bool = True,
    keep_last: int | None = None,
) -> Path:
    """Write `directory/checkpoint-{step}/` atomically and return its path.

    `extra` must be JSON-safe (sampler state, `weighter.state_dict()`, metrics); tuples
    come back as lists. `keep_last=K` deletes all but the K newest checkpoints afterwards.
    Saving a step that already exists replaces it.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    own: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tensors['{key}'] is a {type(value).__name__}, not a tensor")
        _encode(value, key, own)
    aux: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"format_version": FORMAT_VERSION, "step": int(step), "extra": extra or {}}
    if optimizer is not None:
        state["optimizer"] = _encode(optimizer.state_dict(), "optimizer", aux)
    if scheduler is not None:
        state["scheduler"] = _encode(scheduler.state_dict(), "scheduler", aux)
    if rng:
        snap = capture_rng_state()
        state["rng"] = {"tensors": _encode(snap.tensors, "rng", aux), "meta": snap.meta}
    state_text = json.dumps(state)  # fails before touching the disk if `extra` is not JSON-safe

    final = directory / f"checkpoint-{step}"
    tmp = directory / f".tmp-checkpoint-{step}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(own, str(tmp / TENSORS_FILE), metadata={"format": "pt"})
        save_file(aux, str(tmp / STATE_TENSORS_FILE), metadata={"format": "pt"})
        (tmp / STATE_FILE).write_text(state_text, encoding="utf-8")
        for name in (TENSORS_FILE, STATE_TENSORS_FILE, STATE_FILE):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if final.exists():
            _remove_hidden(final)
        os.rename(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if keep_last is not None:
        older = [p for p in list_checkpoints(directory) if p != final]
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            _remove_hidden(old)
    return final


def _group_tensors(optimizer) -> list[dict[str, torch.Tensor]]:
    """The tensor-valued hyperparameters of each param group (a capturable optimizer's
    learning rates, on its device: what a CUDA graph and the scheduler's fill_ hold)."""
    return [{k: v for k, v in g.items() if isinstance(v, torch.Tensor)} for g in getattr(optimizer, "param_groups", [])]


def _restore_group_tensors(optimizer, held: list[dict[str, torch.Tensor]]) -> None:
    """`load_state_dict` replaces each group's hyperparameters with the checkpoint's (tensors
    read to the CPU): copy their values into the tensors the groups held instead, so they
    keep their device and identity."""
    for group, old in zip(getattr(optimizer, "param_groups", []), held):
        for key, tensor in old.items():
            if key in group:
                tensor.copy_(torch.as_tensor(group[key], dtype=tensor.dtype))
                group[key] = tensor


def load_checkpoint(
    path: str | Path,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
    device: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Read a checkpoint; restore `optimizer`, `scheduler` and (by default) the RNGs in place.

    Build the optimizer over the same parameters in the same order as when saving;
    `torch.optim.Optimizer.load_state_dict` moves state tensors to the parameters'
    device. `tensors` are returned on `device` for the caller to load into its modules.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise TasktuneError(f"{path}: not a tasktune checkpoint (no {STATE_FILE})")
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("format_version") != FORMAT_VERSION:
        raise TasktuneError(f"{path}: checkpoint format {state.get('format_version')} is not {FORMAT_VERSION}")
    tensors = load_file(str(path / TENSORS_FILE), device=str(device))
    aux = load_file(str(path / STATE_TENSORS_FILE), device="cpu")

    for what, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is None:
            continue
        if what not in state:
            raise TasktuneError(f"{path}: the checkpoint has no {what} state to resume from")
        held = _group_tensors(target)  # (none for a scheduler or FSDP's OptimizerState)
        try:
            target.load_state_dict(_decode(state[what], aux))
        except (ValueError, KeyError) as exc:
            raise TasktuneError(f"{path}: cannot restore the {what}: {exc}") from None
        _restore_group_tensors(target, held)
    if restore_rng and "rng" in state:
        restore_rng_state(RngState(tensors=_decode(state["rng"]["tensors"], aux), meta=state["rng"]["meta"]))
    return LoadedCheckpoint(path=path, step=int(state["step"]), tensors=tensors, extra=state.get("extra", {}))
