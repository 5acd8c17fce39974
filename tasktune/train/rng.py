"""Capture and restore every random number generator a training step may draw from.

A resumed run is bitwise identical to an uninterrupted one only if dropout masks, data
shuffles and PCGrad's task order continue from exactly where they were. Those come from
four generators: torch's CPU generator, torch's CUDA generators (one per device), numpy's
global generator (`np.random.*`) and python's `random`. Generators a caller creates
itself (`np.random.default_rng`, a `torch.Generator`) are the caller's to save, e.g. in
the checkpoint's `extra`.

The state is split the way a checkpoint stores it: tensors (torch generator states as
uint8 tensors, for safetensors) and JSON-safe values (numpy's and python's integer states).
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class RngState:
    """`tensors`: name -> uint8 state tensor; `meta`: JSON-safe numpy and python states."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def capture_rng_state() -> RngState:
    """Snapshot all four generators (CUDA only when it is available)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    np_state = np.random.get_state(legacy=False)
    version, py_state, gauss = random.getstate()
    meta = {
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": [int(k) for k in np_state["state"]["key"]],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "cuda_devices": len(tensors) - 1,
    }
    return RngState(tensors=tensors, meta=meta)


def restore_rng_state(state: RngState) -> None:
    """Put every generator back. CUDA states are restored for as many devices as both the
    checkpoint and this machine have; a mismatch warns (the run is then not bitwise
    reproducible, but still correct)."""
    torch.set_rng_state(state.tensors["torch_cpu"].to(torch.uint8).cpu())
    saved_cuda = [state.tensors[f"torch_cuda_{i}"] for i in range(int(state.meta.get("cuda_devices", 0)))]
    have_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved_cuda and have_cuda:
        for i, s in enumerate(saved_cuda[:have_cuda]):
            torch.cuda.set_rng_state(s.to(torch.uint8).cpu(), device=i)
    if len(saved_cuda) != have_cuda and saved_cuda:
        warnings.warn(
            f"checkpoint has CUDA RNG states for {len(saved_cuda)} device(s), this machine has {have_cuda}",
            stacklevel=2,
        )
    npm = state.meta["numpy"]
    np.random.set_state(
        {
            "bit_generator": npm["bit_generator"],
            "state": {"key": np.asarray(npm["key"], dtype=np.uint32), "pos": npm["pos"]},
            "has_gauss": npm["has_gauss"],
            "gauss": npm["gauss"],
        }
    )
    py = state.meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
