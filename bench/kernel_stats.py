"""What the compiler made of each decode kernel: registers a thread, spilled bytes, shared
memory, warps and stages of every compiled variant (Triton's CompiledKernel fields).

Why: LoRA's expand inside the fused linear's epilogue cost ~7 us a linear more than the
expand launch it replaced (bench/README.md, session 8); spills or a register count that
leaves one program an SM are the first suspects, and they are read here in seconds.

Work: the four linears of a Qwen2.5-0.5B layer at 32 rows through `decode_linear`, without
adapters, with a precomputed delta, with in-launch LoRA (4 distinct adapters) and with the
split LoRA (`h=`, and `h=` with `shrink_next=`); the
BGMV pair (`lora_delta`, 32) for each; decode attention unsplit and split. (Reads Triton's
per-device kernel caches, `JITFunction.device_caches`: an internal of Triton 3.x.)

    PYTHONPATH=. python3 bench/kernel_stats.py           # GPU: writes $OUT/ and bench/results/
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from common import device_name, kernel_bench_args, versions, write_json  # noqa: E402
from decode_linear_bench import QWEN, SMOKE  # noqa: E402


def _compiled(fn) -> dict:
    """{id: CompiledKernel} of every variant `fn` (a JITFunction) holds now."""
    out = {}
    for caches in getattr(fn, "device_caches", {}).values():
        for kernel in caches[0].values():
            out[id(kernel)] = kernel
    return out


def _facts(kernel) -> dict:
    if hasattr(kernel, "_init_handles"):
        kernel._init_handles()
    md = kernel.metadata
    get = (lambda k: md.get(k)) if isinstance(md, dict) else (lambda k: getattr(md, k, None))
    return {"n_regs": getattr(kernel, "n_regs", None), "n_spills": getattr(kernel, "n_spills", None),
            "shared": get("shared"), "num_warps": get("num_warps"), "num_stages": get("num_stages")}


def _new_variants(fn, call) -> list[dict]:
    before = _compiled(fn)
    call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return [_facts(k) for i, k in _compiled(fn).items() if i not in before]


def main() -> None:
    args, device = kernel_bench_args(__doc__)
    from tasktune.lora import triton_ops
    from tasktune.lora.triton_ops import lora_delta
    from tasktune.serve import triton_attention as ta
    from tasktune.serve import triton_linear as tlin

    shapes = SMOKE if args.smoke else QWEN
    M, r, slots, dt = 32, 16, 32, torch.bfloat16
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(device)

    rows_out = []
    for name, rows, K, has_bias, has_res, has_norm, swiglu, widths in shapes:
        N = rows // 2 if swiglu else rows
        W, bias = rand(rows, K, scale=K ** -0.5), rand(rows) if has_bias else None
        norm = (rand(K), 1e-6) if has_norm else None
        x, res = rand(M, K), rand(M, N) if has_res else None
        A, B = rand(slots, len(widths) * r, K, scale=K ** -0.5), rand(slots, rows, r, scale=0.1)
        scaling = torch.full((slots,), 2.0, device=device)
        bounds = tuple(itertools.accumulate(widths))[:-1]
        ids4, ids32 = torch.arange(M, device=device) % 4, torch.arange(M, device=device) % slots
        delta = lora_delta(x, A, B, scaling, ids4, bounds, norm)
        few = tlin.few_adapters(ids4)  # LoRA of <= 4 adapters in the launch (triton_lora_few.py)
        h = torch.zeros(M, A.shape[1], device=device)  # the split LoRA (bench/README.md "Split LoRA")
        ra_next = {"o": 32, "gate_up": 16, "down": 48}.get(name, 16)
        nxt = (rand(slots, ra_next, N, scale=N ** -0.5), rand(N) if has_res else None, ids4,
               torch.zeros(M, ra_next, device=device))
        cases = {
            "base": lambda: tlin.decode_linear(x, W, bias, res, norm=norm, swiglu=swiglu),
            "delta": lambda: tlin.decode_linear(x, W, bias, res, norm=norm, swiglu=swiglu, delta=delta),
            "lora_in_launch": lambda: tlin.decode_linear(x, W, bias, res, norm=norm, swiglu=swiglu,
                                                         lora=(A, B, scaling, ids4), bounds=bounds),
            "split_expand": lambda: tlin.decode_linear(x, W, bias, res, norm=norm, swiglu=swiglu,
                                                       lora=(A, B, scaling, ids4), bounds=bounds, h=h),
            "split_both": lambda: tlin.decode_linear(x, W, bias, res, norm=norm, swiglu=swiglu,
                                                     lora=(A, B, scaling, ids4), bounds=bounds, h=h, shrink_next=nxt),
            "few": lambda: tlin.decode_linear(x, W, bias, res, norm=norm, swiglu=swiglu,
                                              lora=(A, B, scaling, ids4), bounds=bounds, few=few),
        }
        for case, call in cases.items():
            for facts in _new_variants(tlin._decode_linear, call):
                rows_out.append({"kernel": "_decode_linear", "linear": name, "case": case, **facts})
        for kern in (triton_ops.bgmv_shrink, triton_ops.bgmv_expand):
            for facts in _new_variants(kern, lambda: lora_delta(x, A, B, scaling, ids32, bounds, norm)):
                rows_out.append({"kernel": kern.fn.__name__, "linear": name, "case": "bgmv_delta", **facts})
    H, KVH, HD, L = 14, 2, 64, (64 if args.smoke else 384)
    kc, vc = (rand(M, KVH, L + 8, HD) for _ in range(2))
    q, kn, vn = rand(M, H, HD), rand(M, KVH, HD), rand(M, KVH, HD)
    pos = (torch.arange(M, device=device) * 3) % L
    for splits, kern in ((1, ta._decode_attention), (3, ta._decode_attention_split)):
        for facts in _new_variants(kern, lambda: ta.decode_attention(q, kn, vn, kc, vc, pos, L, splits=splits)):
            rows_out.append({"kernel": kern.fn.__name__, "linear": "attention", "case": f"splits={splits}", **facts})
    result = {"bench": "kernel_stats", "device": device_name(device), "versions": versions("triton"),
              "config": {"rows": M, "r": r, "slots": slots, "dtype": "bfloat16"}, "kernels": rows_out}
    results = REPO / "bench" / "results" / "kernel_stats.json" if device.type == "cuda" else None
    write_json(result, "kernel_stats.json", [args.out], [results])
    print(f"\ncompiled decode kernels on {result['device']}:")
    print(f"{'kernel':<26}{'linear':<10}{'case':<16}{'regs':>6}{'spills':>8}{'shared':>8}{'warps':>6}{'stages':>7}")
    for k in rows_out:
        print(f"{k['kernel']:<26}{k['linear']:<10}{k['case']:<16}{k['n_regs']!s:>6}{k['n_spills']!s:>8}"
              f"{k['shared']!s:>8}{k['num_warps']!s:>6}{k['num_stages']!s:>7}")


if __name__ == "__main__":
    main()
