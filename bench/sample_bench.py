"""Sampled decoding's draw alone: the device draw (tasktune/serve/triton_sample.py, passes
split over (row, chunk) programs) against torch's batched draw (`sampling.draw`: the
filters, a sort for top-p, the exponential race; what the logits path runs) and the greedy
argmax (triton_argmax, the floor: one read of the logits).

Work: 32 rows of Qwen2.5-0.5B's vocabulary (151,936 bf16 logits, randn * SCALE, so that a
few hundred tokens hold most of the mass as in a trained LM), temperature 0.8 with top-p
0.95 (the serve bench's sampled variant), top-p 0.5 (more rejection rounds), min-p 0.05,
top-k 50 (Hugging Face's default) and plain temperature. Each timing is the median replay of a CUDA graph holding 8 calls,
divided by 8 (torch's draw, which copies host inputs, runs eagerly, 8 calls a sync). Each
case also reports how often its draws take more than the first round (the top-p
rejections), from the tokens drawn over 512 positions.

    PYTHONPATH=. python3 bench/sample_bench.py          # GPU: writes $OUT/ and bench/results/
    .venv/bin/python bench/sample_bench.py --smoke      # CPU: tiny shapes, the interpreter
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from common import copy_bandwidth, device_name, kernel_bench_args, timed_graph, versions, write_json  # noqa: E402

CALLS = 8  # calls a graph
SCALE = 3.0  # logit spread
CASES = {"t0.8_top_p0.95": (0.8, 0.95, 0.0, 0), "t1_top_p0.5": (1.0, 0.5, 0.0, 0), "t1_min_p0.05": (1.0, 1.0, 0.05, 0),
         "t1_top_k50": (1.0, 1.0, 0.0, 50), "t0.7_top_k20_top_p0.8": (0.7, 0.8, 0.0, 20), "t1": (1.0, 1.0, 0.0, 0)}


def main() -> None:
    args, device = kernel_bench_args(__doc__)
    from tasktune.serve import triton_argmax, triton_sample
    from tasktune.serve.sampling import SamplingParams, draw

    M, V = (32, 151936) if not args.smoke else (4, 1000)
    replays = 20 if not args.smoke else 1
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(M, V, generator=g) * SCALE).to(torch.bfloat16).to(device)
    rows = torch.arange(M, device=device)
    keys = torch.arange(M, device=device) + 300
    out = torch.empty(M, dtype=torch.long, device=device)
    argmax_s = timed_graph(lambda: [triton_argmax.argmax_rows(logits) for _ in range(CALLS)], device, replays) / CALLS
    result = {"bench": "sample_bench", "device": device_name(device), "versions": versions("triton"),
              "config": {"rows": M, "vocab": V, "dtype": "bfloat16", "logit_scale": SCALE, "calls_a_graph": CALLS,
                         "replays": replays, "chunk": triton_sample.CHUNK, "split_rounds": triton_sample.SPLIT_ROUNDS},
              "copy_bandwidth": copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 20)),
              "argmax_us": argmax_s * 1e6, "cases": {}}
    for name, (t, top_p, min_p, top_k) in CASES.items():
        table = triton_sample.SamplingTable(M, device)
        for s in range(M):
            table.set(s, t, top_p, min_p, s, top_k)
        params = [SamplingParams(temperature=t, top_p=top_p, min_p=min_p, top_k=top_k)] * M
        device_s = timed_graph(lambda: [triton_sample.sample_rows(logits, rows, rows, keys, table, out)
                                        for _ in range(CALLS)], device, replays) / CALLS
        torch_s = _timed(lambda: draw(logits.float(), params, [None] * M), device, replays)  # (host inputs: no graph)
        late = 0  # draws a first-round token would not give: rejected at least once
        positions = 512 if not args.smoke else 4
        for k in range(positions):
            triton_sample.sample_rows(logits, rows, rows, keys + k, table, out)
            first = _first_round(logits, rows, keys + k, table, out.clone())
            late += int((first != out).sum())
        result["cases"][name] = {"temperature": t, "top_p": top_p, "min_p": min_p, "top_k": top_k, "device_us": device_s * 1e6,
                                 "torch_us": torch_s * 1e6, "speedup_vs_torch": torch_s / device_s,
                                 "x_argmax": device_s / argmax_s, "draws_past_round_0": late / (positions * M)}
    results = REPO / "bench" / "results" if device.type == "cuda" else None  # a smoke run keeps the GPU's
    write_json(result, "sample_bench.json", [args.out, results])
    print(f"\nSampled draw, {result['device']}, {M} rows x {V}: argmax {argmax_s * 1e6:.1f} us")
    print(f"{'case':>16}{'device us':>11}{'torch us':>10}{'x torch':>9}{'x argmax':>10}{'past r0':>9}")
    for name, c in result["cases"].items():
        print(f"{name:>16}{c['device_us']:>11.1f}{c['torch_us']:>10.1f}{c['speedup_vs_torch']:>9.1f}"
              f"{c['x_argmax']:>10.2f}{c['draws_past_round_0']:>9.3f}")


def _timed(fn, device, replays: int) -> float:
    """Median seconds of fn() run eagerly, CALLS calls at a time, the device synced around them."""
    times = []
    for _ in range(replays):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(CALLS):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / CALLS)
    return statistics.median(times)


def _first_round(logits, rows, keys, table, out):
    """The tokens of round 0 alone (top-p 1, no top-k: the first draw is kept; min-p's rows keep it)."""
    from tasktune.serve import triton_sample

    plain = triton_sample.SamplingTable(len(rows), logits.device)
    plain.params.copy_(table.params)
    plain.params[:, 1] = 1.0
    plain.params[:, 3] = 0.0
    plain.seeds.copy_(table.seeds)
    triton_sample.sample_rows(logits, rows, rows, keys, plain, out)
    return out


if __name__ == "__main__":
    main()
