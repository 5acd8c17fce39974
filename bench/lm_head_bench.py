"""The greedy decode step's tail: final RMSNorm + LM head + argmax as one Triton launch
(tasktune/serve/triton_lm_head.py) against the three launches it replaces (torch's norm,
cuBLAS's LM head, triton_argmax), and the fused launch's shape (vocabulary rows and K
block a program, warps, pipeline stages).

Work: Qwen2.5-0.5B's tail (hidden 896, vocabulary 151,936, bf16) at 32 rows. Each timing is
the median replay of a CUDA graph holding 8 calls (one LM head's 272 MB does not stay in
L2 between them), divided by 8. Every fused configuration's argmax must equal the argmax
of its own logits, and its logits must be within bf16 rounding of the unfused path's.
The weight bytes over the time give each path's effective bandwidth.

    PYTHONPATH=. python3 bench/lm_head_bench.py          # GPU: writes $OUT/ and bench/results/
    .venv/bin/python bench/lm_head_bench.py --smoke      # CPU: tiny shapes, the interpreter
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import copy_bandwidth, device_name, kernel_bench_args, timed_graph, versions, write_json  # noqa: E402

CALLS = 8  # calls a graph


def main() -> None:
    args, device = kernel_bench_args(__doc__)
    from tasktune.serve import triton_argmax, triton_lm_head as th

    M, K, V = (32, 896, 151936) if not args.smoke else (4, 64, 1000)
    replays = 20 if not args.smoke else 1
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    x = (torch.randn(M, K, generator=g) * 3).to(dt).to(device)
    nw = (1 + 0.1 * torch.randn(K, generator=g)).to(dt).to(device)
    w = (torch.randn(V, K, generator=g) / K ** 0.5).to(dt).to(device)
    eps = 1e-6

    def unfused():
        for _ in range(CALLS):
            logits = F.linear(nw * F.rms_norm(x, (K,), eps=eps), w)
            out = triton_argmax.argmax_rows(logits) if device.type == "cuda" else logits.argmax(-1)
        return logits, out

    ref_logits, _ = unfused()
    base_s = timed_graph(unfused, device, replays) / CALLS
    weight_bytes = V * K * 2
    result = {"bench": "lm_head_bench", "device": device_name(device), "versions": versions("triton"),
              "config": {"rows": M, "hidden": K, "vocab": V, "dtype": "bfloat16", "calls_a_graph": CALLS,
                         "replays": replays, "weight_bytes": weight_bytes},
              "copy_bandwidth": copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 20)),
              "unfused_us": base_s * 1e6, "unfused_weight_TB_s": weight_bytes / base_s / 1e12, "runs": []}
    default = (th.BLOCK_N, th.BLOCK_K, th.NUM_WARPS, th.NUM_STAGES)
    configs = [default]
    if not args.smoke:
        # (session 12's sweeps: N blocks 64-512, K blocks 32-256, 2-8 warps, 2-6 stages; K blocks of 64 won by far,
        # then the rest within ~5%; here the default's neighbours)
        configs += [c for c in itertools.product((64, 128, 256), (64, 128), (4, 8), (3, 4)) if c != default]
    for bn, bk, warps, stages in configs:
        cfg = dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
        run = {"block_n": bn, "block_k": bk, "warps": warps, "stages": stages}
        try:
            def fused():
                for _ in range(CALLS):
                    out = th.lm_head_argmax(x, nw, eps, w, **cfg)
                return out
            logits, top = fused()
            run["argmax_exact"] = top.tolist() == logits.float().argmax(-1).tolist()
            run["max_abs_diff_vs_unfused"] = (logits.float() - ref_logits.float()).abs().max().item()
            s = timed_graph(fused, device, replays) / CALLS
        except Exception as e:  # a shape the GPU cannot hold (shared memory): recorded, not fatal
            run["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            result["runs"].append(run)
            continue
        run.update(us=s * 1e6, weight_TB_s=weight_bytes / s / 1e12, speedup_vs_unfused=base_s / s)
        result["runs"].append(run)
    ok = sorted((r for r in result["runs"] if "us" in r), key=lambda r: r["us"])
    result["best"] = ok[0] if ok else None
    result["default"] = result["runs"][0]
    results = REPO / "bench" / "results" if device.type == "cuda" else None  # a smoke run keeps the GPU's
    write_json(result, "lm_head_bench.json", [args.out, results])
    print(f"\nLM head tail, {result['device']}: unfused (norm + cuBLAS + argmax) {base_s * 1e6:.1f} us "
          f"({result['unfused_weight_TB_s']:.2f} TB/s of weights); copy "
          f"{result['copy_bandwidth']['bytes_per_s'] / 1e12:.2f} TB/s; fused, fastest 10 of {len(ok)} "
          f"(default {'/'.join(map(str, default))} first):")
    print(f"{'block_n':>8}{'block_k':>8}{'warps':>6}{'stages':>7}{'us':>8}{'TB/s':>7}{'x unfused':>10}{'exact':>6}{'diff':>9}")
    for r in [result["runs"][0]] + ok[:10]:
        if "us" in r:
            print(f"{r['block_n']:>8}{r['block_k']:>8}{r['warps']:>6}{r['stages']:>7}{r['us']:>8.1f}"
                  f"{r['weight_TB_s']:>7.2f}{r['speedup_vs_unfused']:>10.3f}{str(r['argmax_exact']):>6}"
                  f"{r['max_abs_diff_vs_unfused']:>9.1e}")


if __name__ == "__main__":
    main()
