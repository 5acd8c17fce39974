"""One fused decode linear under Nsight Compute: why is it latency-bound?

The serve bench's no-adapter step spends ~0.7 ms in 96 fused linears that stream their
weights at 0.4-1.6 TB/s against ~4.2 TB/s copy bandwidth (bench/README.md). Sweeps of launch
shapes stopped paying; this reads the hardware's view of one launch instead: occupancy
and what limits it, achieved DRAM throughput, SM active cycles against elapsed, warp
stalls (sections SpeedOfLight, MemoryWorkloadAnalysis, WarpStateStats, Occupancy,
LaunchStats).

Work: Qwen2.5-0.5B's gate_up (RMSNorm + [9728, 896] + silu * up) or down ([896, 4864] +
residual) at 32 rows, bf16, the decoder's default launch configuration, without PDL (ncu
times one kernel alone, clocks locked to base: durations are longer than in a CUDA graph).

    python3 bench/ncu_linear.py gate_up                # the work alone (what ncu launches)
    bash bench/gpu_all.sh with STEPS=ncu                # GPU: ncu on gate_up and down, text under $OUT/ncu
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SHAPES = {"gate_up": (9728, 896), "down": (896, 4864)}  # weight [rows, K]


def main() -> None:
    from tasktune.serve.triton_linear import decode_linear

    which = sys.argv[1] if len(sys.argv) > 1 else "gate_up"
    if which not in SHAPES:
        raise SystemExit(f"ncu_linear: which linear? one of {', '.join(SHAPES)}, not {which!r}")
    g = torch.Generator().manual_seed(0)
    rows, K = SHAPES[which]
    M, dev, dt = 32, "cuda", torch.bfloat16
    W = (torch.randn(rows, K, generator=g) * K ** -0.5).to(dev, dt)
    x = torch.randn(M, K, generator=g).to(dev, dt)
    if which == "gate_up":
        nw = torch.rand(K, generator=g).to(dev, dt)
        run = lambda: decode_linear(x, W, None, None, norm=(nw, 1e-6), swiglu=True)  # noqa: E731
    else:
        res = torch.randn(M, rows, generator=g).to(dev, dt)
        run = lambda: decode_linear(x, W, None, res)  # noqa: E731
    for _ in range(4):  # compiles on the first; ncu profiles the 4th launch (--launch-skip 3)
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
