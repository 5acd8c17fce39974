"""The decode step's linears as the engine chains them, without attention: does a chain of
different fused linears cost what `decode_linear_bench.py` (24 launches of one linear)
predicts, with and without LoRA?

Work: 24 layers of Qwen2.5-0.5B's four linears at 32 rows, bf16, each feeding the next as
in a decode step (attention replaced by the first 896 qkv columns): RMSNorm + qkv; o +
residual; RMSNorm + gate_up + silu * up; down + residual. One CUDA graph of the 24 layers,
median of 50 replays. Cases: no adapter, 4 and 32 distinct adapters over the rows (r=16,
32 slots, B as the pool stores it). Paths: the decoder's default, each fused launch adding
the delta of the BGMV pair before it (`lora_delta`, the norm's weight in its shrink and the
1 / rms in the linear as `triton_linear.DELTA_BEFORE_RMS` says); LoRA carried between the
fused launches (`triton_lora_chain`: the shrink in the producer's epilogue, the expand in
the consumer; a shrink launch where attention would be); the fused launches with
LoRA inside them (`LoraStacks.fused_linears`); cuBLAS + eager ops (+ the BGMV pair in place).

    PYTHONPATH=. python3 bench/decode_layers_bench.py          # GPU: writes $OUT/ and bench/results/
    .venv/bin/python bench/decode_layers_bench.py --smoke      # CPU: tiny shapes, the interpreter
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import copy_bandwidth, device_name, kernel_bench_args, timed_graph, versions, write_json  # noqa: E402


def main() -> None:
    args, device = kernel_bench_args(__doc__)
    from tasktune.lora.triton_ops import lora_apply_, lora_delta
    from tasktune.serve import triton_linear, triton_lora_chain
    from tasktune.serve.triton_linear import decode_linear, linear_config
    from tasktune.serve.triton_lora_chain import UCH, chain_buffers, lora_chain_shrink

    D, Q, KV, I, layers, replays = (64, 64, 16, 128, 2, 1) if args.smoke else (896, 896, 128, 4864, 24, 50)
    M, r, slots, dt = 32, 16, 32, torch.bfloat16
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(device)

    # name: (weight rows, K, module widths)
    shapes = {"qkv": (Q + 2 * KV, D, (Q, KV, KV)), "o": (D, Q, (D,)), "gate_up": (2 * I, D, (I, I)),
              "down": (D, I, (D,))}
    W = [{n: rand(rows, k, scale=k ** -0.5) for n, (rows, k, _) in shapes.items()} for _ in range(layers)]
    bias = [rand(Q + 2 * KV) for _ in range(layers)]
    norms = [(rand(D).abs() + 0.5, rand(D).abs() + 0.5) for _ in range(layers)]
    AB = [{n: (rand(slots, len(w) * r, k, scale=k ** -0.5), rand(slots, rows, r, scale=0.1))
           for n, (rows, k, w) in shapes.items()} for _ in range(layers)]
    bounds = {n: tuple(sum(w[:i + 1]) for i in range(len(w) - 1)) for n, (_, _, w) in shapes.items()}
    scaling = torch.full((slots,), 2.0, device=device)
    x0 = rand(M, D)
    cases = {"base": None, "a4": torch.arange(M, device=device) % 4, "a32": torch.arange(M, device=device) % slots}

    def fused(ids, delta: bool = False):
        rms = not triton_linear.DELTA_BEFORE_RMS  # whether the delta holds the norm's 1 / rms

        def lin(i, n, x, **kw):
            if delta and ids is not None:  # the decoder's default: the BGMV pair's delta, then the launch
                d = lora_delta(x, *AB[i][n], scaling, ids, bounds[n], kw.get("norm"), rms=rms)
                return decode_linear(x, W[i][n], delta=d, delta_rms=rms, bounds=bounds[n], **kw)
            return decode_linear(x, W[i][n], lora=None if ids is None else (*AB[i][n], scaling, ids),
                                 bounds=bounds[n], **kw)

        def fn():
            x = x0
            for i in range(layers):
                qkv = lin(i, "qkv", x, bias=bias[i], norm=(norms[i][0], 1e-6))
                x = lin(i, "o", qkv[:, :Q].contiguous(), residual=x)
                act = lin(i, "gate_up", x, norm=(norms[i][1], 1e-6), swiglu=True)
                x = lin(i, "down", act, residual=x)
            return x
        return fn

    def chained(ids, expand: bool = True, shrink: bool = True, o_launch: bool = True, gu_split: int = 0):
        """LoRA carried between the launches (triton_lora_chain): each linear's epilogue shrinks
        for the next, a shrink launch for the first qkv and for o (attention's place)."""
        if ids is None:
            return fused(None)
        roles = {n: i for i, n in enumerate(("qkv", "o", "gate_up", "down"))}
        zero = {"qkv": r, "o": 3 * r, "gate_up": r, "down": 2 * r}  # the rank columns of the role before

        def lin(i, n, x, out=None, **kw):  # (expand / shrink False: the split timings, wrong numbers)
            return decode_linear(x, W[i][n], bounds=bounds[n], chain_in=(AB[i][n][1], scaling, ids, roles[n], zero[n])
                                 if expand else None, chain_out=out if shrink else None, **kw)

        def fn():
            x = x0
            if shrink:
                lora_chain_shrink(x, AB[0]["qkv"][0], scaling, ids, 0, norms[0][0])
            for i in range(layers):
                qkv = lin(i, "qkv", x, bias=bias[i], norm=(norms[i][0], 1e-6))
                o_in = qkv[:, :Q].contiguous()
                if shrink and o_launch:
                    lora_chain_shrink(o_in, AB[i]["o"][0], scaling, ids, 1)
                x = lin(i, "o", o_in, (AB[i]["gate_up"][0], scaling, ids, norms[i][1], 2), residual=x)
                act = lin(i, "gate_up", x, (AB[i]["down"][0], scaling, ids, None, 3), norm=(norms[i][1], 1e-6),
                          swiglu=True, config=linear_config(M, I, D, split_k=gu_split) if gu_split else None)
                nxt = (AB[i + 1]["qkv"][0], scaling, ids, norms[i + 1][0], 0) if i + 1 < layers else None
                x = lin(i, "down", act, nxt, residual=x)
            return x
        return fn

    def eager(ids):
        def lin(i, n, h, b=None):
            y = F.linear(h, W[i][n], b)
            if ids is not None:
                lora_apply_(y, h, *AB[i][n], scaling, ids, bounds[n])
            return y

        def fn():
            x = x0
            for i in range(layers):
                qkv = lin(i, "qkv", norms[i][0] * F.rms_norm(x, (D,), eps=1e-6), bias[i])
                x = x + lin(i, "o", qkv[:, :Q].contiguous())
                gu = lin(i, "gate_up", norms[i][1] * F.rms_norm(x, (D,), eps=1e-6))
                x = x + lin(i, "down", F.silu(gu[:, :I]) * gu[:, I:])
            return x
        return fn

    def alone(n, ids, side):
        """24 launches of linear n, each on the same input (as decode_linear_bench): plain, with
        its LoRA chain's expand ("in") or shrink for a next linear of 2 modules ("out"), or
        after the BGMV pair ("delta")."""
        rows, K, _ = shapes[n]
        N = rows // 2 if n == "gate_up" else rows
        x = rand(M, K)
        kw = dict(norm=(norms[0][0] if K == D else rand(K).abs() + 0.5, 1e-6)) if n in ("qkv", "gate_up") else {}
        kw.update(swiglu=n == "gate_up", residual=rand(M, N) if n in ("o", "down") else None)
        nxt = [rand(slots, 2 * r, N, scale=N ** -0.5) for _ in range(layers)]

        def fn():
            for i in range(layers):
                if side == "delta":
                    d = lora_delta(x, *AB[i][n], scaling, ids, bounds[n], kw.get("norm"), rms=False)
                    decode_linear(x, W[i][n], delta=d, delta_rms=False, bounds=bounds[n], **kw)
                else:
                    decode_linear(x, W[i][n], bounds=bounds[n], **kw,
                                  chain_in=(AB[i][n][1], scaling, ids, 0, 0) if side == "in" else None,
                                  chain_out=(nxt[i], scaling, ids, None, 1) if side == "out" else None)
        return fn

    result = {"bench": "decode_layers_bench", "device": device_name(device), "versions": versions("triton"),
              "config": {"rows": M, "layers": layers, "r": r, "slots": slots, "dtype": "bfloat16", "replays": replays},
              "copy_bandwidth": copy_bandwidth(device, (1 << 20) if args.smoke else (1 << 30)), "cases": {}}
    for case, ids in cases.items():
        e_out = eager(ids)()
        err = lambda out: ((out.float() - e_out.float()).abs().max() / e_out.float().abs().max()).item()  # noqa: E731
        few = ids is None or len(set(ids.tolist())) <= UCH  # what the chain takes (more: the BGMV pair)
        t = lambda fn: timed_graph(fn, device, replays) / layers * 1e6 if few else float("nan")  # noqa: E731
        c = {"chain_us_per_layer": t(chained(ids)), "max_rel_err_chain_vs_eager": err(chained(ids)()) if few else None,
             "chain_expand_only_us_per_layer": t(chained(ids, shrink=False)),
             "chain_shrink_only_us_per_layer": t(chained(ids, expand=False)),
             "chain_epilogue_shrinks_only_us_per_layer": t(chained(ids, expand=False, o_launch=False)),
             "delta_us_per_layer": timed_graph(fused(ids, delta=True), device, replays) / layers * 1e6,
             "fused_us_per_layer": timed_graph(fused(ids), device, replays) / layers * 1e6,
             "eager_us_per_layer": timed_graph(eager(ids), device, replays) / layers * 1e6,
             "max_rel_err_delta_vs_eager": err(fused(ids, delta=True)()), "max_rel_err_fused_vs_eager": err(fused(ids)())}
        if few and ids is not None:
            c["alone_us_per_launch"] = {n: {side: timed_graph(alone(n, ids, side), device, replays) / layers * 1e6
                                            for side in ("base", "in", "out", "delta")} for n in shapes}
            chain_buffers(device).zero_()
            for split in (1, 2):  # gate_up's programs: 76 N blocks x this many K splits (default 4)
                chain_buffers(device).zero_()
                c[f"chain_gate_up_split{split}_us_per_layer"] = t(chained(ids, gu_split=split))
            triton_lora_chain.DEBUG = 3  # shrink atomics spread over 8 times the addresses (wrong sums)
            for n in shapes:
                c["alone_us_per_launch"][n]["out_spread8"] = timed_graph(alone(n, ids, "out"), device, replays) / layers * 1e6
            c["chain_spread8_us_per_layer"] = t(chained(ids))
            triton_lora_chain.DEBUG = 0
            chain_buffers(device).zero_()
            print({k: round(v, 2) for k, v in c.items() if "chain" in k and v is not None}, flush=True)
            print({n: {k: round(v, 2) for k, v in d.items()} for n, d in c["alone_us_per_launch"].items()}, flush=True)
        result["cases"][case] = c
        chain_buffers(device).zero_()  # the split timings leave sums no consumer cleared
        print(f"{case}: chain with the expand alone {c['chain_expand_only_us_per_layer']:.1f}, the shrink alone "
              f"{c['chain_shrink_only_us_per_layer']:.1f} us a layer", flush=True)
        print(f"{case}: chain {c['chain_us_per_layer']:.1f} (err {c['max_rel_err_chain_vs_eager'] or 0:.1e}), "
              f"BGMV delta + fused {c['delta_us_per_layer']:.1f} us a layer, LoRA in the fused launches "
              f"{c['fused_us_per_layer']:.1f}, cuBLAS + eager {c['eager_us_per_layer']:.1f}; max rel err against "
              f"eager {c['max_rel_err_delta_vs_eager']:.1e}, {c['max_rel_err_fused_vs_eager']:.1e}", flush=True)
    results = REPO / "bench" / "results" if device.type == "cuda" else None  # a smoke run keeps the GPU's
    write_json(result, "decode_layers_bench.json", [args.out, results])
    print(f"\nfour linears a layer, chained, {result['device']} (us a layer):")
    print(f"{'case':<6}{'chain':>8}{'delta+fused':>12}{'LoRA in fused':>14}{'cuBLAS+eager':>14}")
    for case, c in result["cases"].items():
        print(f"{case:<6}{c['chain_us_per_layer']:>8.1f}{c['delta_us_per_layer']:>12.1f}{c['fused_us_per_layer']:>14.1f}"
              f"{c['eager_us_per_layer']:>14.1f}")


if __name__ == "__main__":
    main()
