"""Compile the Triton kernels a CPU smoke run launches, for Hopper (sm_90), on this machine.

Triton's compiler needs no GPU: this runs a bench's smoke path with every launch of the
named kernels recorded instead of run (the interpreter off, CPU tensors as stand-ins), then
compiles each distinct launch to a cubin for sm_90 with PDL on, as the GPU would. A kernel
that does not compile (a type error, a constexpr branch the interpreter never noticed, too
much shared memory) fails here in seconds instead of in a device run. Each line also gives
the registers a thread, stack (spills) and static shared memory: what sets how many programs
share an SM.

    .venv/bin/python bench/compile_sm90.py [--full]   # decode_layers_bench's launches (--full: real shapes)
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.bool: "i1"}


class Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kw) records the launch."""

    def __init__(self, fn):
        self.fn, self.launches = fn, {}

    def __getitem__(self, grid):
        def launch(*args, **kw):
            names = self.fn.arg_names
            bound = dict(zip(names, args), **kw)
            sig, const = {}, {}
            for name in names:
                value = bound.get(name, self.fn.params[names.index(name)].default)
                if self.fn.params[names.index(name)].is_constexpr:
                    sig[name], const[name] = "constexpr", value
                elif isinstance(value, torch.Tensor):
                    sig[name] = "*" + TYPES[value.dtype]
                elif isinstance(value, bool):
                    sig[name] = "i1"
                elif isinstance(value, int):
                    sig[name] = "i64" if abs(value) >= 2 ** 31 else "i32"
                else:
                    sig[name] = "fp32"
            opts = {k: v for k, v in kw.items() if k in ("num_warps", "num_stages")}
            self.launches[(tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in const.items())),
                           tuple(sorted(opts.items())))] = (sig, const, opts)
        return launch


def usage(cubin: bytes) -> str:
    """cuobjdump's registers a thread, spill stores and shared memory for the compiled kernel."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    got = {k: re.search(rf"{k}:(\d+)", out) for k in ("REG", "STACK", "SHARED")}
    return " ".join(f"{k.lower()} {m.group(1) if m else '?'}" for k, m in got.items())


def compile_all(recorders: dict[str, Recorder]) -> int:
    failed = 0
    for name, rec in recorders.items():
        for sig, const, opts in rec.launches.values():
            if "PDL" in const:  # the GPU's launch: PDL on (the CPU run had it off)
                const["PDL"], const["EARLY"] = True, True
            if "UPCAST" in const:  # (the interpreter's fp32 dots)
                const["UPCAST"] = False
            t = time.perf_counter()
            try:
                k = triton.compile(ASTSource(rec.fn, sig, const), target=GPUTarget("cuda", 90, 32),
                                   options=dict(launch_pdl=True, **opts))
                flags = ",".join([k for k, v in const.items() if v is True]
                                 + [f"{k}={const[k]}" for k in ("BLOCK_N", "BLOCK_K", "SPLIT_K") if k in const]
                                 + [f"{k}={v}" for k, v in opts.items()])
                print(f"ok   {name} [{flags}] {usage(k.asm['cubin'])} {time.perf_counter() - t:.1f} s", flush=True)
            except Exception as e:  # noqa: BLE001 (report every failing launch, then fail)
                failed += 1
                cause = f" (caused by {type(e.__cause__).__name__}: {str(e.__cause__)[:1000]})" if e.__cause__ else ""
                print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}{cause}", flush=True)
    return failed


def main() -> None:
    from tasktune.lora import triton_ops
    from tasktune.serve import triton_linear, triton_shrink

    kernels = [(triton_linear, "_decode_linear"), (triton_shrink, "_shrink_rows_kernel"),
               (triton_ops, "bgmv_shrink"), (triton_ops, "bgmv_expand")]
    recs = {}
    for module, name in kernels:
        recs[name] = Recorder(getattr(module, name))
        setattr(module, name, recs[name])
    triton_linear.available = lambda device=None: True
    full = "--full" in sys.argv[1:]  # the GPU run's shapes (the eager parts run on this CPU)
    sys.argv = [sys.argv[0]] + ([] if full else ["--smoke"])
    sys.path.insert(0, str(REPO / "bench"))
    import decode_layers_bench

    try:
        decode_layers_bench.main()
    except Exception as e:  # noqa: BLE001 (the run's numbers are meaningless: the kernels never ran)
        print(f"(smoke run stopped: {type(e).__name__}: {e})")
    sys.exit(1 if compile_all(recs) else 0)


if __name__ == "__main__":
    main()
