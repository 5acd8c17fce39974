"""The decode attention kernel's launch shape: which keys block, warps and pipeline stages
(and context splits) make one layer's decode attention fastest at the serve bench's work?

Work: Qwen2.5-0.5B's attention shape (14 query heads, 2 KV heads, head size 64) at 32 rows,
positions 256..383 (ragged, as sequences are mid-decode), context bucket 384, bf16, rotary
applied in the kernel, q / k / v as views of a qkv output (as the decoder passes them).
24 calls on 24 layers' caches in one CUDA graph (from HBM, not L2), median of 50 replays,
per configuration of `triton_attention` (BLOCK_L, NUM_WARPS, NUM_STAGES; splits through
`default_splits`); every configuration's output is checked against the default's.

    PYTHONPATH=. python3 bench/decode_attention_bench.py          # GPU: writes $OUT/ and bench/results/
    .venv/bin/python bench/decode_attention_bench.py --smoke      # CPU: tiny shapes, the interpreter
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from common import device_name, kernel_bench_args, timed_graph, versions, write_json  # noqa: E402


def main() -> None:
    args, device = kernel_bench_args(__doc__)
    from tasktune.serve import triton_attention as ta

    M, H, KVH, HD = 32, 14, 2, 64
    layers, replays, length, max_len = (2, 1, 64, 72) if args.smoke else (24, 50, 384, 392)
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    caches = [tuple(torch.randn(M, KVH, max_len, HD, generator=g).to(dt).to(device) for _ in range(2))
              for _ in range(layers)]
    qkv = [torch.randn(M, (H + 2 * KVH) * HD, generator=g).to(dt).to(device) for _ in range(layers)]
    positions = (length - 128 + torch.arange(M) * 4 % 128).clamp(max=length - 1).to(device) if not args.smoke else \
        torch.arange(M).remainder(length).to(device)
    inv = 1.0 / (1e6 ** (torch.arange(0, HD, 2).float() / HD))
    emb = torch.cat([torch.arange(max_len).float()[:, None] * inv] * 2, dim=-1)
    sin = emb.sin()
    sin[:, :HD // 2].neg_()
    cos, sin = emb.cos().to(device), sin.to(device)

    def fn():
        outs = []
        for i in range(layers):
            t = qkv[i]
            q, k, v = (t[:, lo * HD:hi * HD].view(M, -1, HD) for lo, hi in ((0, H), (H, H + KVH), (H + KVH, H + 2 * KVH)))
            outs.append(ta.decode_attention(q, k, v, *caches[i], positions, length, cos, sin))
        return outs

    default = (ta.BLOCK_L, ta.NUM_WARPS, ta.NUM_STAGES, 0)
    configs = [default]  # (BLOCK_L, NUM_WARPS, NUM_STAGES, splits): the default first
    if not args.smoke:
        configs += [c + (0,) for c in itertools.product((32, 64, 128, 256), (1, 2, 4, 8), (1, 2, 3, 4))
                    if c + (0,) != configs[0] and not (c[0] == 256 and c[1] < 4)]
        configs += [bl_ws + (s,) for bl_ws, s in itertools.product((default[:3], (64, 4, 3), (64, 2, 3)), (2, 3, 6))]
    else:
        configs += [(32, 2, 2, 0), default[:3] + (2,)]
    result = {"bench": "decode_attention_bench", "device": device_name(device), "versions": versions("triton"),
              "config": {"rows": M, "heads": H, "kv_heads": KVH, "head_dim": HD, "length_bucket": length,
                         "positions": [int(positions.min()), int(positions.max())], "layers": layers,
                         "replays": replays}, "runs": []}
    ref = None
    for block_l, warps, stages, splits in configs:
        ta.BLOCK_L, ta.NUM_WARPS, ta.NUM_STAGES, ta.default_splits = block_l, warps, stages, splits or 1
        try:
            out = torch.stack(fn())
            ref = out if ref is None else ref
            err = (out.float() - ref.float()).abs().max().item()
            us = timed_graph(fn, device, replays) / layers * 1e6
        except Exception as e:  # a shape the GPU cannot hold (shared memory): recorded, not fatal
            result["runs"].append({"block_l": block_l, "warps": warps, "stages": stages, "splits": splits,
                                   "error": f"{type(e).__name__}: {str(e)[:160]}"})
            continue
        result["runs"].append({"block_l": block_l, "warps": warps, "stages": stages, "splits": splits,
                               "us_per_layer": us, "max_abs_diff_vs_default": err})
    ta.BLOCK_L, ta.NUM_WARPS, ta.NUM_STAGES, ta.default_splits = *default[:3], 0
    ok = sorted((r for r in result["runs"] if "us_per_layer" in r), key=lambda r: r["us_per_layer"])
    result["best"] = ok[0] if ok else None
    results = REPO / "bench" / "results" if device.type == "cuda" else None  # a smoke run keeps the GPU's
    write_json(result, "decode_attention_bench.json", [args.out, results])
    print(f"\ndecode attention, {result['device']}, us a layer (fastest 12 of {len(ok)}; default "
          f"{'/'.join(map(str, default[:3]))}/unsplit "
          f"{result['runs'][0].get('us_per_layer', float('nan')):.2f}):")
    print(f"{'block_l':>8}{'warps':>6}{'stages':>7}{'splits':>7}{'us':>8}{'diff':>9}")
    for r in ok[:12]:
        print(f"{r['block_l']:>8}{r['warps']:>6}{r['stages']:>7}{r['splits']:>7}{r['us_per_layer']:>8.2f}"
              f"{r['max_abs_diff_vs_default']:>9.1e}")


if __name__ == "__main__":
    main()
