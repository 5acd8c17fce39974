"""The decode step's linears as the engine chains them, without attention: does a chain of
different fused linears cost what `decode_linear_bench.py` (24 launches of one linear)
predicts, with and without LoRA?

Work: 24 layers of Qwen2.5-0.5B's four linears at 32 rows, bf16, each feeding the next as
in a decode step (attention replaced by the first 896 qkv columns): RMSNorm + qkv; o +
residual; RMSNorm + gate_up + silu * up; down + residual. One CUDA graph of the 24 layers,
median of 50 replays. Cases: no adapter, 4 and 32 distinct adapters over the rows (r=16,
32 slots, B as the pool stores it). Paths: the decoder's default, each fused launch adding
the delta of the BGMV pair before it (`lora_delta`, the norm's weight in its shrink and the
1 / rms in the linear as `triton_linear.DELTA_BEFORE_RMS` says); the fused launches with
LoRA inside them (`LoraStacks.fused_linears`); each shrink in the epilogue of the launch
before (`decode_linear(shrink_next=)`, o's and the first qkv's a launch of their own) and the
linear only expanding (`h=`); cuBLAS + eager ops (+ the BGMV pair in place).

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
    def options(ap):
        ap.add_argument("--streams", action="store_true", help="also time the BGMV pair on a second stream")
        ap.add_argument("--worker", type=int, nargs="*", default=None,
                        help="also time the persistent LoRA worker (bench/lora_worker.py), GPU, 4 adapters: "
                             "its program counts (default 16)")
        ap.add_argument("--few-only", action="store_true",
                        help="only the base and a4 cases' default and few-adapter paths (quick device runs)")
        ap.add_argument("--per-linear", action="store_true",
                        help="only time each linear alone (24 launches a graph) with the split LoRA's pieces, 4 adapters")

    args, device = kernel_bench_args(__doc__, options)
    from tasktune.lora.triton_ops import lora_apply_, lora_delta
    from tasktune.serve import triton_linear
    from tasktune.serve.triton_linear import decode_linear, few_adapters, linear_config
    from tasktune.serve.triton_shrink import lora_shrink_rows

    D, Q, KV, I, layers, replays = (64, 64, 64, 128, 2, 1) if args.smoke else (896, 896, 128, 4864, 24, 50)
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
    nk = {"qkv": (Q + 2 * KV, D), "o": (D, Q), "gate_up": (I, D), "down": (D, I)}  # linear_config's (N, K)
    scaling = torch.full((slots,), 2.0, device=device)
    x0 = rand(M, D)
    cases = {"base": None, "a4": torch.arange(M, device=device) % 4, "a32": torch.arange(M, device=device) % slots}

    def chain(lin, before=lambda: None):
        """Every layer's four linears in decode order, each through lin(layer, name, x, **kw)."""
        def fn():
            before()
            x = x0
            for i in range(layers):
                qkv = lin(i, "qkv", x, bias=bias[i], norm=(norms[i][0], 1e-6))
                x = lin(i, "o", qkv[:, :Q].contiguous(), residual=x)
                act = lin(i, "gate_up", x, norm=(norms[i][1], 1e-6), swiglu=True)
                x = lin(i, "down", act, residual=x)
            return x
        return fn

    def fused(ids, delta: bool = False, few: bool = False, config=None):
        rms = not triton_linear.DELTA_BEFORE_RMS  # whether the delta holds the norm's 1 / rms
        tables = few_adapters(ids) if few else None

        def lin(i, n, x, **kw):
            if few:  # LoRA of <= 4 adapters inside the launch (triton_lora_few.py)
                return decode_linear(x, W[i][n], lora=(*AB[i][n], scaling, ids), bounds=bounds[n], few=tables,
                                     config=config(n) if config else None, **kw)
            if delta and ids is not None:  # the decoder's default: the BGMV pair's delta, then the launch
                d = lora_delta(x, *AB[i][n], scaling, ids, bounds[n], kw.get("norm"), rms=rms)
                return decode_linear(x, W[i][n], delta=d, delta_rms=rms, bounds=bounds[n], **kw)
            return decode_linear(x, W[i][n], lora=None if ids is None else (*AB[i][n], scaling, ids),
                                 bounds=bounds[n], **kw)

        return chain(lin)

    def chained(ids, epilogues: bool = True, launches: bool = True, warps: int = 0):
        """Each linear's shrink in the epilogue of the launch that makes its input (shrink_next=),
        the linear itself only expanding (h=): no launch between the linears of a layer. o's
        shrink is a launch of its own (lora_shrink_rows: in the decoder attention makes o's
        input), as is the first qkv's. One memset of every h a chain. epilogues / launches
        False: without the epilogue shrinks / the shrink launches (timing only, wrong sums).
        warps: the linears' warps a program (0: linear_config's; 8 spills less, compile_sm90)."""
        names = ("qkv", "o", "gate_up", "down")
        ra = {n: AB[0][n][0].shape[1] for n in names}
        flat = torch.zeros(layers * M * sum(ra.values()), device=device)
        views, at = [], 0
        for _ in range(layers):
            views.append({})
            for n in names:
                views[-1][n] = flat[at:at + M * ra[n]].view(M, ra[n])
                at += M * ra[n]

        def lora(i, n):
            return dict(lora=(*AB[i][n], scaling, ids), bounds=bounds[n], h=views[i][n],
                        config=linear_config(M, *nk[n], num_warps=warps) if warps else None)

        def fn():
            flat.zero_()
            x = x0
            if launches:
                lora_shrink_rows(x, AB[0]["qkv"][0], ids, views[0]["qkv"], norms[0][0])
            for i in range(layers):
                nxt = (AB[i + 1]["qkv"][0], norms[i + 1][0], ids, views[i + 1]["qkv"]) if i + 1 < layers else None
                qkv = decode_linear(x, W[i]["qkv"], bias[i], norm=(norms[i][0], 1e-6), **lora(i, "qkv"))
                o_in = qkv[:, :Q].contiguous()
                if launches:
                    lora_shrink_rows(o_in, AB[i]["o"][0], ids, views[i]["o"])
                x = decode_linear(o_in, W[i]["o"], residual=x, **lora(i, "o"),
                                  shrink_next=(AB[i]["gate_up"][0], norms[i][1], ids, views[i]["gate_up"])
                                  if epilogues else None)
                act = decode_linear(x, W[i]["gate_up"], norm=(norms[i][1], 1e-6), swiglu=True, **lora(i, "gate_up"),
                                    shrink_next=(AB[i]["down"][0], None, ids, views[i]["down"]) if epilogues else None)
                x = decode_linear(act, W[i]["down"], residual=x, **lora(i, "down"),
                                  shrink_next=nxt if epilogues else None)
            return x
        return fn

    def per_linear(ids) -> dict:
        """Each linear alone, 24 launches a graph (one weight copy a layer, the same input):
        no adapter, the default (BGMV pair + delta), the expand of a given h, the next
        linear's shrink in the epilogue, both. Which launch pays for the split LoRA?"""
        x_in = {"qkv": x0, "o": rand(M, Q), "gate_up": x0, "down": rand(M, I)}
        kws = {"qkv": dict(bias=None, norm=(norms[0][0], 1e-6)), "o": dict(residual=x0),
               "gate_up": dict(norm=(norms[0][1], 1e-6), swiglu=True), "down": dict(residual=x0)}
        nxt = {"qkv": None, "o": ("gate_up", norms[0][1]), "gate_up": ("down", None), "down": ("qkv", norms[0][0])}
        h = {n: torch.zeros(M, AB[0][n][0].shape[1], device=device) for n in AB[0]}
        tables = few_adapters(ids)
        out = {}
        for n, x in x_in.items():
            kw = dict(kws[n], **({"bias": bias[0]} if n == "qkv" else {}))
            nn, nw = nxt[n] or (None, None)
            lora = lambda i: dict(lora=(*AB[i][n], scaling, ids))  # noqa: E731
            nx = lambda i: dict(shrink_next=(AB[i][nn][0], nw, ids, h[nn]))  # noqa: E731

            def graph(extra, delta=False):
                def fn():
                    for i in range(layers):
                        if delta:
                            d = lora_delta(x, *AB[i][n], scaling, ids, bounds[n], kw.get("norm"), rms=False)
                            decode_linear(x, W[i][n], delta=d, delta_rms=False, bounds=bounds[n], **kw)
                        else:
                            decode_linear(x, W[i][n], bounds=bounds[n], **kw, **extra(i))
                return timed_graph(fn, device, replays) / layers * 1e6

            out[n] = {"base": graph(lambda i: {}), "default": graph(None, delta=True),
                      "few": graph(lambda i: dict(lora(i), few=tables)),
                      "expand": graph(lambda i: dict(lora(i), h=h[n]))}
            if nn is not None:  # (qkv's output goes to attention)
                out[n].update(shrink_next=graph(nx), both=graph(lambda i: dict(lora(i), h=h[n], **nx(i))))
            print(f"{n:8}" + "".join(f"{k} {v:5.1f}  " for k, v in out[n].items()) + "(us a launch)", flush=True)
        return out

    def streamed(ids, deferred: bool):
        """The BGMV pair on a second stream beside each fused launch (session 18's question:
        can LoRA leave the critical path?). deferred: the launch does not wait for the delta,
        the next one does (a consumer would add it as it loads its input: timing only, the
        sums are wrong); else the launch waits for it and adds it (the default's sums)."""
        side = torch.cuda.Stream(device) if device.type == "cuda" else None
        keep: list[torch.Tensor] = []

        def lin(i, n, x, **kw):
            if ids is None:
                return decode_linear(x, W[i][n], bounds=bounds[n], **kw)
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                d = lora_delta(x, *AB[i][n], scaling, ids, bounds[n], kw.get("norm"), rms=True)
            keep.append(d)
            if deferred:
                y = decode_linear(x, W[i][n], bounds=bounds[n], **kw)
                main.wait_stream(side)
                return y
            main.wait_stream(side)
            return decode_linear(x, W[i][n], delta=d, delta_rms=True, bounds=bounds[n], **kw)

        return chain(lin, keep.clear)

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

    def worker_cases(ids) -> dict:
        """The worker path at each program count: us a layer, the worker alone, its error."""
        from lora_worker import WorkerChain

        out = {}
        for programs in args.worker or [16]:
            for prefetch in (False, True):
                wc = WorkerChain(x0, layers, D, Q, KV, I, r, AB, scaling, norms, programs=programs, prefetch=prefetch)
                wc.run(W, bias, ids, load=True)  # every kernel loaded before anything waits on another
                torch.cuda.synchronize(device)
                run = lambda wc=wc: wc.run(W, bias, ids)  # noqa: E731
                key = f"worker{programs}{'_prefetch' if prefetch else ''}"
                out[f"{key}_us_per_layer"] = timed_graph(run, device, replays) / layers * 1e6
                out[f"{key}_alone_us_per_layer"] = timed_graph(
                    lambda wc=wc: wc.alone(ids), device, replays) / layers * 1e6
                out[f"max_rel_err_{key}_vs_eager"] = err(run())
                print(f"{key}: {out[f'{key}_us_per_layer']:.1f} us a layer (the worker alone "
                      f"{out[f'{key}_alone_us_per_layer']:.1f}); max rel err against eager "
                      f"{out[f'max_rel_err_{key}_vs_eager']:.1e}", flush=True)
                if programs == 16 and not prefetch:
                    out[f"{key}_nowait_us_per_layer"] = timed_graph(
                        lambda wc=wc: wc.run(W, bias, ids, wait=False), device,
                        replays) / layers * 1e6
                    print(f"{key}, the linears not waiting: {out[f'{key}_nowait_us_per_layer']:.1f} us a layer",
                          flush=True)
                del wc
        return out

    result = {"bench": "decode_layers_bench", "device": device_name(device), "versions": versions("triton"),
              "config": {"rows": M, "layers": layers, "r": r, "slots": slots, "dtype": "bfloat16", "replays": replays},
              "copy_bandwidth": copy_bandwidth(device, (1 << 20) if args.smoke else (1 << 30)), "cases": {}}
    if args.per_linear:
        result["per_linear_a4_us"] = per_linear(cases["a4"])
        write_json(result, "decode_layers_per_linear.json", [args.out])
        return
    for case, ids in cases.items():
        if args.few_only and case == "a32":
            continue
        e_out = eager(ids)()
        err = lambda out: ((out.float() - e_out.float()).abs().max() / e_out.float().abs().max()).item()  # noqa: E731
        c = {"delta_us_per_layer": timed_graph(fused(ids, delta=True), device, replays) / layers * 1e6,
             "fused_us_per_layer": timed_graph(fused(ids), device, replays) / layers * 1e6,
             "eager_us_per_layer": timed_graph(eager(ids), device, replays) / layers * 1e6,
             **({"side_joined_us_per_layer": timed_graph(streamed(ids, False), device, replays) / layers * 1e6,
                 "side_deferred_us_per_layer": timed_graph(streamed(ids, True), device, replays) / layers * 1e6,
                 "max_rel_err_side_joined_vs_eager": err(streamed(ids, False)())}
                if args.streams and device.type == "cuda" and ids is not None else {}),
             "max_rel_err_delta_vs_eager": err(fused(ids, delta=True)()), "max_rel_err_fused_vs_eager": err(fused(ids)())}
        if case == "a4":
            c["few_us_per_layer"] = timed_graph(fused(ids, few=True), device, replays) / layers * 1e6
            c["max_rel_err_few_vs_eager"] = err(fused(ids, few=True)())
            lcfg = lambda n: linear_config(M, *nk[n], lora=True)  # noqa: E731  (N blocks of 64, 4 splits)
            c["few_lora_config_us_per_layer"] = timed_graph(fused(ids, few=True, config=lcfg), device,
                                                            replays) / layers * 1e6
            gather, triton_linear.FEW_GATHER = triton_linear.FEW_GATHER, not triton_linear.FEW_GATHER
            c[f"few_gather_{triton_linear.FEW_GATHER}_us_per_layer"] = timed_graph(fused(ids, few=True), device,
                                                                                 replays) / layers * 1e6
            triton_linear.FEW_GATHER = gather
            print(f"{case}: LoRA of the few adapters, FEW_GATHER {not gather} "
                  f"{c[f'few_gather_{not gather}_us_per_layer']:.1f} us a layer")
            print(f"{case}: LoRA of the few adapters in the launch {c['few_us_per_layer']:.1f} us a layer "
                  f"(max rel err {c['max_rel_err_few_vs_eager']:.1e}); every linear in 64-row blocks and 4 splits "
                  f"{c['few_lora_config_us_per_layer']:.1f}", flush=True)
        if ids is not None and not args.few_only:
            c["chained_us_per_layer"] = timed_graph(chained(ids), device, replays) / layers * 1e6
            c["max_rel_err_chained_vs_eager"] = err(chained(ids)())
            c["chained_no_launches_us_per_layer"] = timed_graph(chained(ids, launches=False), device,
                                                                replays) / layers * 1e6
            c["chained_expand_only_us_per_layer"] = timed_graph(chained(ids, False, False), device,
                                                                replays) / layers * 1e6
            c["chained_w8_us_per_layer"] = timed_graph(chained(ids, warps=8), device, replays) / layers * 1e6
            c["max_rel_err_chained_w8_vs_eager"] = err(chained(ids, warps=8)())
            print(f"{case}: shrink in the producer's epilogue, 8 warps {c['chained_w8_us_per_layer']:.1f} us a layer "
                  f"(max rel err {c['max_rel_err_chained_w8_vs_eager']:.1e})", flush=True)
            print(f"{case}: shrink in the producer's epilogue {c['chained_us_per_layer']:.1f} us a layer (without "
                  f"the shrink launches {c['chained_no_launches_us_per_layer']:.1f}, the linears' expand alone "
                  f"{c['chained_expand_only_us_per_layer']:.1f}); max rel err against eager "
                  f"{c['max_rel_err_chained_vs_eager']:.1e}", flush=True)
        if args.worker is not None and device.type == "cuda" and case == "a4":
            c.update(worker_cases(ids))
        result["cases"][case] = c
        if "side_joined_us_per_layer" in c:
            print(f"{case}: pair on a second stream, joined {c['side_joined_us_per_layer']:.1f} us a layer, "
                  f"deferred {c['side_deferred_us_per_layer']:.1f}", flush=True)
        print(f"{case}: BGMV delta + fused {c['delta_us_per_layer']:.1f} us a layer, LoRA in the fused launches "
              f"{c['fused_us_per_layer']:.1f}, cuBLAS + eager {c['eager_us_per_layer']:.1f}; max rel err against "
              f"eager {c['max_rel_err_delta_vs_eager']:.1e}, {c['max_rel_err_fused_vs_eager']:.1e}", flush=True)
    results = REPO / "bench" / "results" if device.type == "cuda" else None  # a smoke run keeps the GPU's
    write_json(result, "decode_layers_few.json" if args.few_only else "decode_layers_bench.json", [args.out, results])
    print(f"\nfour linears a layer, chained, {result['device']} (us a layer):")
    print(f"{'case':<6}{'delta+fused':>12}{'LoRA in fused':>14}{'shrink before':>14}{'cuBLAS+eager':>14}")
    for case, c in result["cases"].items():
        print(f"{case:<6}{c['delta_us_per_layer']:>12.1f}{c['fused_us_per_layer']:>14.1f}"
              f"{c.get('chained_us_per_layer', float('nan')):>14.1f}{c['eager_us_per_layer']:>14.1f}")


if __name__ == "__main__":
    main()
