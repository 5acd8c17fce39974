"""Decode-step LoRA kernels: Triton BGMV (tasktune/lora/triton_ops.py) against the torch
gathered path (tasktune/lora/ops.py) and the base GEMMs alone.

Work: N=32 decode rows, r=16, bf16, the 7 Qwen2.5-0.5B LoRA targets per layer (q, k, v, o,
gate, up, down) x 24 layers laid out as the served decoder holds them: q, k, v fused into
one qkv linear and gate, up into one gate_up (their adapter stacks too), so 4 linears a
layer, each with its own base weight and its own stack of 32 adapter slots (so a layer's
adapters are not in L2 from the previous layer). Rows use 4 distinct adapters (row i ->
slot i % 4) or 32 (row i -> slot i).
Cases, all timed as ONE CUDA graph of the 96 linears (launch gaps inside a graph only),
median of many replays, each timed with its own pair of CUDA events:
  base    y = F.linear(x, W) for every linear
  torch   y[:, module] += lora_delta_gathered(x, A_m, B_m, scaling, ids) per module
  triton  lora_apply_(...): BGMV shrink + expand, 2 launches a linear, with the launch
          configuration of triton_ops, then each configuration of SWEEP (how many
          programs the shrink splits d_in over, how many columns an expand program takes)
One graph per path; the adapter mix changes only the ids tensor the graph reads.

    PYTHONPATH=. python3 bench/lora_kernel_bench.py     # GPU: writes $OUT/ or bench/results/
    .venv/bin/python bench/lora_kernel_bench.py --smoke # CPU syntax check: tiny shapes, torch path
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import capture_graph, copy_bandwidth, time_graph  # noqa: E402
from tasktune.lora import triton_ops  # noqa: E402
from tasktune.lora.ops import lora_delta_gathered  # noqa: E402

QWEN_MODULES = [("q_proj", 896, 896), ("k_proj", 896, 128), ("v_proj", 896, 128), ("o_proj", 896, 896),
                ("gate_proj", 896, 4864), ("up_proj", 896, 4864), ("down_proj", 4864, 896)]
SMOKE_MODULES = [(name, 64 if d_in == 896 else 176, {896: 64, 128: 16, 4864: 176}[d_out])
                 for name, d_in, d_out in QWEN_MODULES]
LINEARS = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]  # decoder.FUSED

FORMULAS = {
    "step_us": "median time of one replay of the graph of all modules x layers, CUDA events (host clock with --smoke)",
    "module_us": "step_us / (modules x layers)",
    "lora_bytes": "sum over modules of distinct adapters * r * (d_in + d_out) * 2 (A and B rows each distinct "
                  "adapter read once) + N * d_in * 2 (x read) + 2 * N * d_out * 2 (y read and written), bf16",
    "base_bytes": "sum over modules of d_out * d_in * 2 (W read) + N * d_in * 2 (x read) + N * d_out * 2 (y written)",
    "eff_GB_s": "bytes / step time (lora_bytes for torch and triton, base_bytes for base)",
    "copy_GB_s": "2 * bytes(src) / time of dst.copy_(src) of 1 GiB (bytes read + written), median",
}


@dataclass
class Module:
    """One (fused) linear of the decoder and its adapter stacks (as adapter_pool.stack_storage)."""

    x: torch.Tensor  # [N, d_in] (shared by the linears of one d_in)
    W: torch.Tensor  # [d_out, d_in]
    A: torch.Tensor  # [n_slots, M * r, d_in]
    B: torch.Tensor  # [n_slots, d_out, r]
    scaling: torch.Tensor  # [n_slots] fp32
    y: torch.Tensor  # [N, d_out], updated in place by the LoRA paths
    starts: tuple[int, ...]  # first output column of each of its M modules


def build(shapes, layers: int, n_rows: int, r: int, n_slots: int, device, dtype) -> list[Module]:
    g = torch.Generator(device=device).manual_seed(0)
    dims = {name: (d_in, d_out) for name, d_in, d_out in shapes}
    xs = {d: torch.randn(n_rows, d, device=device, dtype=dtype, generator=g) for d in {s[1] for s in shapes}}
    mods = []
    for _ in range(layers):
        for names in LINEARS:
            d_in, widths = dims[names[0]][0], [dims[n][1] for n in names]
            d_out = sum(widths)
            mods.append(Module(
                x=xs[d_in],
                W=torch.randn(d_out, d_in, device=device, dtype=dtype, generator=g) / d_in**0.5,
                A=torch.randn(n_slots, len(names) * r, d_in, device=device, dtype=dtype, generator=g) / d_in**0.5,
                B=torch.randn(n_slots, d_out, r, device=device, dtype=dtype, generator=g) / r**0.5,
                scaling=torch.full((n_slots,), 2.0, device=device),
                y=torch.zeros(n_rows, d_out, device=device, dtype=dtype),
                starts=tuple(sum(widths[:i]) for i in range(len(names))),
            ))
    return mods


def torch_delta_(m: Module, y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's torch path: each module's delta on its slice of y."""
    r = m.B.shape[2]
    ends = m.starts[1:] + (y.shape[1],)
    for i, (a, b) in enumerate(zip(m.starts, ends)):
        y[:, a:b].add_(lora_delta_gathered(m.x, m.A[:, i * r:(i + 1) * r], m.B[:, a:b], m.scaling, ids))
    return y


def step_fn(path: str, mods: list[Module], ids: torch.Tensor):
    """One decode step's worth of work for `path`, as a closure over static tensors."""
    def base():
        for m in mods:
            F.linear(m.x, m.W)

    def torch_path():
        for m in mods:
            torch_delta_(m, m.y, ids)

    def triton_path():
        for m in mods:
            triton_ops.lora_apply_(m.y, m.x, m.A, m.B, m.scaling, ids, m.starts[1:])

    return {"base": base, "torch": torch_path}.get(path, triton_path)


def time_cpu(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lora_bytes(shapes, layers: int, n_rows: int, r: int, distinct: int, elem: int = 2) -> int:
    per_layer = sum(distinct * r * (d_in + d_out) + n_rows * d_in + 2 * n_rows * d_out for _, d_in, d_out in shapes)
    return layers * per_layer * elem


def base_bytes(shapes, layers: int, n_rows: int, elem: int = 2) -> int:
    return layers * sum(d_out * d_in + n_rows * d_in + n_rows * d_out for _, d_in, d_out in shapes) * elem


SWEEP = {  # label: (TARGET_PROGRAMS, MAX_SPLIT, EXPAND_TILE) of triton_ops, tried after its defaults
    "t256 s8": (256, 8, 2048), "t128 s4": (128, 4, 2048), "t1024 s32": (1024, 32, 2048),
    "t2048 s64": (2048, 64, 2048), "t512 s16 n64": (512, 16, 1024), "t1024 s32 n64": (1024, 32, 1024),
    "t512 s16 n256": (512, 16, 4096),
}


def set_launch(target: int, max_split: int, expand_tile: int) -> None:
    triton_ops.TARGET_PROGRAMS, triton_ops.MAX_SPLIT, triton_ops.EXPAND_TILE = target, max_split, expand_tile
    triton_ops.launch_config.cache_clear()


def check_paths_agree(mods: list[Module], ids: torch.Tensor) -> float:
    """Max |triton - torch| / max |torch| of the LoRA delta alone (y = 0), first layer's linears."""
    worst = 0.0
    for m in mods[:len(LINEARS)]:
        ref = torch_delta_(m, torch.zeros_like(m.y), ids)
        out = triton_ops.lora_apply_(torch.zeros_like(m.y), m.x, m.A, m.B, m.scaling, ids, m.starts[1:])
        worst = max(worst, ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU syntax check: tiny shapes, 2 layers, torch path only")
    ap.add_argument("--reps", type=int, default=200, help="timed graph replays per case")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/lora_kernel_bench.json, else bench/results/)")
    args = ap.parse_args()

    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not (torch.cuda.is_available() and triton_ops.available("cuda")):
        sys.exit("needs a CUDA GPU and Triton (or --smoke on the CPU)")
    shapes = SMOKE_MODULES if smoke else QWEN_MODULES
    layers, n_rows, r, n_slots = (2, 8, 16, 8) if smoke else (24, 32, 16, 32)
    reps = 3 if smoke else args.reps
    default = (triton_ops.TARGET_PROGRAMS, triton_ops.MAX_SPLIT, triton_ops.EXPAND_TILE)
    launches = {"triton": default, **{f"triton {k}": v for k, v in SWEEP.items()}}
    paths = ["base", "torch"] if smoke else ["base", "torch", *launches]
    mixes = {"a4": 4, "a32": 32} if not smoke else {"a4": 4, "a8": 8}

    mods = build(shapes, layers, n_rows, r, n_slots, device, torch.bfloat16)
    ids = torch.zeros(n_rows, dtype=torch.long, device=device)  # the graphs' input, rewritten per mix
    graphs = {}
    for path in [] if smoke else paths:  # each launch configuration captured into its own graph
        set_launch(*launches.get(path, default))
        graphs[path] = capture_graph(step_fn(path, mods, ids))
    set_launch(*default)

    def measure(path: str) -> float:
        return time_cpu(step_fn(path, mods, ids), reps) if smoke else time_graph(graphs[path], reps)

    rows, agree = [], {}
    base_s = measure("base")
    rows.append(dict(case="base", path="base", distinct=0, step_us=base_s * 1e6,
                     bytes=base_bytes(shapes, layers, n_rows)))
    for mix, distinct in mixes.items():
        ids.copy_(torch.arange(n_rows, device=device) % distinct)
        if "triton" in paths:
            agree[mix] = check_paths_agree(mods, ids)
            if agree[mix] > 5e-2:  # bf16 rounding of the torch path is ~1e-2 at most
                sys.exit(f"triton and torch disagree on {mix}: max rel. diff {agree[mix]:.2e}")
        for path in paths[1:]:
            rows.append(dict(case=f"{path} {mix}", path=path, distinct=distinct, step_us=measure(path) * 1e6,
                             bytes=lora_bytes(shapes, layers, n_rows, r, distinct)))
    n_mod = layers * len(LINEARS)
    for row in rows:
        row["module_us"] = row["step_us"] / n_mod
        row["eff_GB_s"] = row["bytes"] / (row["step_us"] * 1e-6) / 1e9
        row["vs_base"] = row["step_us"] / (base_s * 1e6)

    print(f"{'case':<24} {'step us':>9} {'linear us':>10} {'MB moved':>9} {'eff GB/s':>9} {'x base':>7}")
    for row in rows:
        print(f"{row['case']:<24} {row['step_us']:>9.1f} {row['module_us']:>10.2f} {row['bytes'] / 1e6:>9.1f} "
              f"{row['eff_GB_s']:>9.1f} {row['vs_base']:>7.2f}")
    by_case = {row["case"]: row for row in rows}
    speedup = {mix: by_case[f"torch {mix}"]["step_us"] / by_case[f"triton {mix}"]["step_us"]
               for mix in mixes if f"triton {mix}" in by_case}
    for mix, x in speedup.items():
        print(f"triton vs torch, {mix}: {x:.2f}x faster; max rel. diff on layer 0: {agree[mix]:.1e}")
    best = {mix: min((row for row in rows if row["path"] in launches and row["distinct"] == d), key=lambda r: r["step_us"])
            for mix, d in mixes.items()} if "triton" in paths else {}
    for mix, row in best.items():
        print(f"fastest launch configuration, {mix}: {row['path']} {launches[row['path']]} {row['step_us']:.1f} us")

    result = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        smoke=smoke, torch=torch.__version__,
        triton=getattr(triton_ops.triton, "__version__", None),
        n_rows=n_rows, r=r, n_slots=n_slots, layers=layers, modules=[list(s) for s in shapes], dtype="bf16",
        reps=reps, rows=rows, speedup_triton_vs_torch=speedup, max_rel_diff_triton_vs_torch=agree,
        linears=[list(names) for names in LINEARS],
        launch_configs=None if smoke else {
            f"{m.A.shape[2]}x{m.B.shape[1]}": asdict(triton_ops.launch_config(n_rows, m.A.shape[2], m.B.shape[1], r,
                                                                              len(m.starts)))
            for m in mods[:len(LINEARS)]},
        sweep={k: dict(zip(("TARGET_PROGRAMS", "MAX_SPLIT", "EXPAND_TILE"), v)) for k, v in launches.items()},
        fastest={mix: row["path"] for mix, row in best.items()},
        copy_GB_s=None if smoke else copy_bandwidth(device)["bytes_per_s"] / 1e9, formulas=FORMULAS,
    )
    if result["copy_GB_s"]:
        print(f"device copy bandwidth: {result['copy_GB_s']:.0f} GB/s ({result['device']})")
    if args.out:
        path = Path(args.out)
    elif os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "lora_kernel_bench.json"
    elif smoke:  # never overwrite the GPU result with a CPU smoke run
        path = Path(tempfile.gettempdir()) / "lora_kernel_bench_smoke.json"
    else:
        path = REPO / "bench" / "results" / "lora_kernel_bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
