"""The decode step's linears: cuBLAS (+ the LoRA kernel pair) against one fused Triton launch.

Work: the four linears of a Qwen2.5-0.5B layer as the served decoder runs them at a decode
batch of M rows (default 32), bf16: RMSNorm + qkv (bias), o (+ residual), RMSNorm + gate_up
+ silu(gate) * up, down (+ residual). Each linear has 24 weight copies (one per layer) so weights come from
HBM, not L2. Every case is ONE CUDA graph of the 24 calls, replayed many times (median of
CUDA-event timings): per-call time includes the launch gaps a graph has.
  cublas   F.linear + the eager ops around it (RMSNorm before, bias inside cuBLAS, silu * up
           after gate_up, + residual after), and with adapters the Triton BGMV shrink + expand
           pair (triton_ops)
  fused    tasktune.serve.triton_linear.decode_linear: one launch, each configuration of a
           sweep (N block, K block, K splits), then warps / stages for the best; each also
           without programmatic dependent launch (PDL: a launch overlaps the previous one's tail)
Adapters: 32 slots r=16 per linear (its own stack per layer, B as the pool stores it:
[slots, rows, r] contiguous), rows over 4 or 32 of them.

    PYTHONPATH=. python3 bench/decode_linear_bench.py          # GPU: writes $OUT/ and bench/results/
    .venv/bin/python bench/decode_linear_bench.py --smoke      # CPU: tiny shapes, the interpreter
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

# name, weight rows, K (weight [rows, K]), bias, residual, RMSNorm in, swiglu out, fused LoRA module widths
QWEN = [("qkv", 1152, 896, True, False, True, False, (896, 128, 128)), ("o", 896, 896, False, True, False, False, (896,)),
        ("gate_up", 9728, 896, False, False, True, True, (4864, 4864)), ("down", 896, 4864, False, True, False, False, (896,))]
SMOKE = [("qkv", 96, 64, True, False, True, False, (64, 16, 16)), ("o", 64, 64, False, True, False, False, (64,)),
         ("gate_up", 256, 64, False, False, True, True, (128, 128)), ("down", 64, 128, False, True, False, False, (64,))]


# warps / stages tried around the best block shape: one K block a program (qkv, gate_up at
# 4 splits) gains nothing from stages it cannot pipeline but pays their shared memory in
# programs an SM holds
WARPS_STAGES = ((4, 1), (4, 2), (8, 1), (8, 2), (4, 4), (8, 3), (2, 3))


def _options(ap) -> None:
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--no-sweep", action="store_true", help="time the default configuration (and a few with LoRA) only")
    ap.add_argument("--results", default=None, help="also write the JSON here (default on a GPU: bench/results/"
                    "decode_linear_bench.json, or decode_linear_bench_no_sweep.json with --no-sweep)")


def main() -> None:
    args, device = kernel_bench_args(__doc__, _options)
    from tasktune.lora import triton_ops
    from tasktune.lora.triton_ops import lora_apply_
    from tasktune.serve.triton_linear import decode_linear, linear_config

    shapes, layers, replays = (SMOKE, 2, 1) if args.smoke else (QWEN, 24, 50)
    M, r, slots, dt = args.rows, 16, 32, torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    result = {"bench": "decode_linear_bench", "device": device_name(device), "versions": versions("triton"),
              "config": {"rows": M, "layers": layers, "r": r, "slots": slots, "dtype": "bfloat16", "replays": replays},
              "copy_bandwidth": copy_bandwidth(device, (1 << 20) if args.smoke else (1 << 30)), "linears": {}}
    bw = result["copy_bandwidth"]["bytes_per_s"]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(device)

    for name, rows, K, has_bias, has_res, has_norm, swiglu, widths in shapes:
        N = rows // 2 if swiglu else rows
        Ws = [rand(rows, K, scale=K ** -0.5) for _ in range(layers)]
        biases = [rand(rows) if has_bias else None for _ in range(layers)]
        norm = (rand(K), 1e-6) if has_norm else None
        x = rand(M, K)
        res = rand(M, N) if has_res else None
        mods = len(widths)
        As = [rand(slots, mods * r, K, scale=K ** -0.5) for _ in range(layers)]
        Bs = [rand(slots, rows, r, scale=0.1) for _ in range(layers)]
        scaling = torch.full((slots,), 2.0, device=device)
        bounds = tuple(itertools.accumulate(widths))[:-1]
        ids_by_case = {"base": None, "a4": torch.arange(M, device=device) % 4, "a32": torch.arange(M, device=device) % slots}

        def eager(i, ids):
            h = norm[0] * F.rms_norm(x, (K,), eps=norm[1]) if norm else x
            y = F.linear(h, Ws[i], biases[i])
            if ids is not None:
                lora_apply_(y, h, As[i], Bs[i], scaling, ids, bounds)
            if swiglu:
                y = F.silu(y[:, :N]) * y[:, N:]
            return y + res if res is not None else y

        def cublas(ids):
            def fn():
                for i in range(layers):
                    eager(i, ids)
            return fn

        def fused(ids, cfg):
            def fn():
                for i in range(layers):
                    decode_linear(x, Ws[i], biases[i], res, norm=norm, swiglu=swiglu, config=cfg,
                                  lora=None if ids is None else (As[i], Bs[i], scaling, ids), bounds=bounds)
            return fn

        # correctness of the fused launch against the cuBLAS path, with adapters
        ids = ids_by_case["a32"]
        want = eager(0, ids)
        got = decode_linear(x, Ws[0], biases[0], res, norm=norm, swiglu=swiglu, lora=(As[0], Bs[0], scaling, ids),
                            bounds=bounds)
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()

        w_bytes = rows * K * 2
        entry = {"N": N, "K": K, "weight_bytes": w_bytes, "max_rel_err_vs_cublas_a32": err, "cases": {}}
        base_us = {c: timed_graph(cublas(i), device, replays) / layers * 1e6 for c, i in ids_by_case.items()}
        sweep = []
        block_ns = (16, 32) if args.smoke else (16, 32, 64)
        if args.no_sweep:  # the default configuration only (and the LoRA sweep's few)
            block_ns = ()
        block_ks = (64,) if args.smoke else (128, 256)
        splits = (1, 2) if args.smoke else (1, 2, 4, 8)
        for bn, bk, sk in itertools.product(block_ns, block_ks, splits):
            if sk > 1 and -(-K // bk) < sk:
                continue
            cfg = linear_config(M, N, K, block_n=bn, block_k=bk, split_k=sk)
            try:
                us = timed_graph(fused(None, cfg), device, replays) / layers * 1e6
            except Exception as e:  # a configuration the compiler rejects (shared memory)
                print(f"  {name} {cfg}: {type(e).__name__}", flush=True)
                continue
            sweep.append((us, cfg))
        default = linear_config(M, N, K)
        if not sweep:
            sweep.append((timed_graph(fused(None, default), device, replays) / layers * 1e6, default))
        sweep.sort(key=lambda t: t[0])
        best_us, best = sweep[0]
        tuned = []
        for warps, stages in WARPS_STAGES if not args.smoke else []:  # (--no-sweep: around the default)
            cfg = linear_config(M, N, K, block_n=best.BLOCK_N, block_k=best.BLOCK_K, split_k=best.SPLIT_K,
                                num_warps=warps, num_stages=stages)
            try:
                tuned.append((timed_graph(fused(None, cfg), device, replays) / layers * 1e6, cfg))
            except Exception as e:
                print(f"  {name} {cfg}: {type(e).__name__}", flush=True)
        best_us, best = min(tuned + [(best_us, best)], key=lambda t: t[0])
        entry["warps_stages"] = [{"us": us, **cfg.__dict__} for us, cfg in tuned]
        lora_sweep = []  # with adapters the best N block / split may differ
        lora_default = linear_config(M, N, K, True)
        lora_cfgs = [lora_default] + [cfg for _, cfg in sweep[:6]] + [best]
        if args.no_sweep:
            lora_cfgs += [linear_config(M, N, K, True, block_n=bn, split_k=sk) for bn, sk in ((32, 0), (64, 2), (64, 8))]
        for cfg in dict.fromkeys(lora_cfgs):
            lora_sweep.append((timed_graph(fused(ids_by_case["a4"], cfg), device, replays) / layers * 1e6, cfg))
        lora_us, lora_best = min(lora_sweep, key=lambda t: t[0])
        entry["lora_best_config"] = lora_best.__dict__
        entry["lora_sweep"] = [{"us_a4": us, **cfg.__dict__} for us, cfg in lora_sweep]
        for case, ids in ids_by_case.items():
            c = {"cublas_us": base_us[case],
                 "fused_best_us": timed_graph(fused(ids, best if ids is None else lora_best), device, replays) / layers * 1e6,
                 "fused_default_us": timed_graph(fused(ids, default if ids is None else lora_default), device,
                                                 replays) / layers * 1e6}
            triton_ops.PDL = False  # the same launches without programmatic dependent launch
            c["fused_best_no_pdl_us"] = timed_graph(fused(ids, best if ids is None else lora_best), device,
                                                    replays) / layers * 1e6
            triton_ops.PDL = True
            c["speedup_best"] = c["cublas_us"] / c["fused_best_us"]
            c["speedup_default"] = c["cublas_us"] / c["fused_default_us"]
            entry["cases"][case] = c
        entry["best_config"] = best.__dict__
        entry["default_config"] = default.__dict__
        entry["weight_TB_s_best_base"] = w_bytes / (entry["cases"]["base"]["fused_best_us"] * 1e-6) / 1e12
        entry["weight_TB_s_cublas_base"] = w_bytes / (base_us["base"] * 1e-6) / 1e12
        entry["sweep_top"] = [{"us": us, **cfg.__dict__} for us, cfg in sweep[:8]]
        result["linears"][name] = entry
        print(f"{name}: err {err:.2e}; " + ", ".join(
            f"{case} cublas {c['cublas_us']:.2f} us / fused {c['fused_best_us']:.2f} (default {c['fused_default_us']:.2f})"
            for case, c in entry["cases"].items()) + f"; best {best}", flush=True)
        print(f"  {name} warps/stages at {best.BLOCK_N}/{best.BLOCK_K}/{best.SPLIT_K}: " + ", ".join(
            f"{cfg.num_warps}/{cfg.num_stages} {us:.2f}" for us, cfg in tuned), flush=True)

    layer = {case: {k: sum(result["linears"][n]["cases"][case][k] for n in result["linears"])
                    for k in ("cublas_us", "fused_best_us", "fused_default_us", "fused_best_no_pdl_us")}
             for case in ("base", "a4", "a32")}
    result["layer_sum_us"] = layer
    name = "decode_linear_bench_no_sweep.json" if args.no_sweep else "decode_linear_bench.json"  # (the sweep's kept)
    results = args.results or (REPO / "bench" / "results" / name if device.type == "cuda" else None)
    write_json(result, "decode_linear_bench.json", [args.out], [results])
    print(f"\ndecode linears on {result['device']}, M={M}, copy {bw / 1e12:.2f} TB/s; one layer's four linears (us):")
    print(f"{'case':<6}{'cublas':>10}{'fused best':>12}{'fused default':>15}{'best no PDL':>13}{'ratio':>8}")
    for case, v in layer.items():
        print(f"{case:<6}{v['cublas_us']:>10.2f}{v['fused_best_us']:>12.2f}{v['fused_default_us']:>15.2f}"
              f"{v['fused_best_no_pdl_us']:>13.2f}{v['cublas_us'] / v['fused_best_us']:>8.2f}")


if __name__ == "__main__":
    main()
