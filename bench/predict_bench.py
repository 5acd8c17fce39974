"""Scoring a closed-set task's labels: the labels as branches of one prefill against one
prompt-only request a label (how /v1/tasks/{task}/predict scored up to 16 labels before
session 18), on the serve bench's model.

Work: one 64-token prompt through one r=16 adapter, 2 / 16 / 150 labels (yes/no; the old
exact limit; CLINC150's intent count) of 2-6 random tokens and the end token, each
label's total log-likelihood after the prompt. Both ways run in the same process on the same engine (bf16 on a GPU: the tree a
CUDA graph replay, branch_graphs.py; prompt-only requests a prefill that keeps every
position, replayed from graphs since session 20); medians of `--repeats` predictions after
one untimed (which captures). The two ways' totals are compared (max abs difference) and
must pick the same label. Then prompt scoring itself: 1 / 8 / 32 requests of 256 random
tokens with prompt_logprobs, through the prefill graphs against the eager prefill.

    PYTHONPATH=. python3 bench/predict_bench.py             # GPU: writes $OUT/ and bench/results/
    .venv/bin/python bench/predict_bench.py --smoke         # CPU: the tiny shapes
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from common import device_name, model_facts, qwen_config, versions, write_json  # noqa: E402
from serve_setup import make_base_and_adapters  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--labels", default="2,16,150", help="label counts, comma-separated")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one branch prediction")
    args = ap.parse_args()
    from tasktune.serve.branch_scoring import pack_branches
    from tasktune.serve.engine import Engine, Request
    from tasktune.serve.sampling import SamplingParams

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    tiny = args.smoke or device.type != "cuda"
    config = qwen_config(tiny, eos_token_id=0, bos_token_id=None, pad_token_id=0, **({"vocab_size": 4096} if tiny else {}))
    rng = random.Random(0)
    prompt = [rng.randrange(2, config.vocab_size) for _ in range(args.prompt_len)]
    counts = [int(c) for c in args.labels.split(",")]
    result = {"bench": "predict_bench", "device": device_name(device), "versions": versions(),
              "model": model_facts(config), "dtype": "bfloat16",
              "config": {"prompt_tokens": args.prompt_len, "repeats": args.repeats, "r": 16}, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, root, names, peft_model, _ = make_base_and_adapters(config, Path(tmp), 1, 16, 32.0, device)
        del peft_model
        eng = Engine.from_pretrained(base_dir, adapter_root=root, device=str(device), dtype=torch.bfloat16,
                                     max_len=2048, max_running=32, max_waiting=1024)
        eng.pool.register_root()
        for count in counts:
            labels = [[rng.randrange(2, config.vocab_size) for _ in range(rng.randint(2, 6))] + [0]
                      for _ in range(count)]

            def tree() -> list[float]:
                packs = pack_branches(len(prompt), [len(t) for t in labels], eng.max_len - 1)
                cs = eng.generate([Request(prompt, names[0], SamplingParams(max_tokens=0),
                                           branches=[labels[i] for i in p]) for p in packs])
                return [sum(lps) for c in cs for lps in c.branch_logprobs]

            def per_label() -> list[float]:
                cs = eng.generate([Request(prompt + t, names[0], SamplingParams(max_tokens=0, prompt_logprobs=0))
                                   for t in labels])
                return [sum(lp.logprob for lp in c.prompt_logprobs[len(prompt):]) for c in cs]

            def timed(fn) -> tuple[float, list[float]]:
                out = fn()  # untimed: allocator and kernels warm
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    out = fn()
                    times.append(time.perf_counter() - t)
                return sorted(times)[len(times) // 2], out

            t_tree, s_tree = timed(tree)
            t_each, s_each = timed(per_label)
            if args.profile and count == max(counts):
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                with profile(activities=acts) as prof:
                    tree()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
            diff = max(abs(a - b) for a, b in zip(s_tree, s_each))
            pick = lambda v: max(range(len(v)), key=v.__getitem__)  # noqa: E731
            result["cases"][str(count)] = {
                "label_tokens": sum(map(len, labels)), "branches_ms": t_tree * 1e3, "per_label_requests_ms": t_each * 1e3,
                "speedup": t_each / t_tree, "max_abs_diff_total_logprob": diff, "same_label": pick(s_tree) == pick(s_each)}
        result["prompt_scoring"] = prompt_scoring(eng, names[0], config.vocab_size, rng, args.repeats,
                                                  (1, 8, 32), 256 if not tiny else 40)
    results = REPO / "bench" / "results" if device.type == "cuda" else None  # a smoke run keeps the GPU's
    write_json(result, "predict_bench.json", [args.out, results])
    print(f"\nprompt scoring (prompt_logprobs, max_tokens 0) of {result['prompt_scoring']['prompt_tokens']}-token "
          "prompts, ms a batch:")
    print(f"{'requests':>9}{'graphs':>9}{'eager':>9}{'speedup':>9}{'max diff':>10}")
    for n, c in result["prompt_scoring"]["cases"].items():
        print(f"{n:>9}{c['graphs_ms']:>9.1f}{c['eager_ms']:>9.1f}{c['speedup']:>8.1f}x{c['max_abs_diff_logprob']:>10.3g}")
    print(f"\nlabels after a {args.prompt_len}-token prompt, {result['device']} (ms a prediction):")
    print(f"{'labels':>7}{'branches':>10}{'a request a label':>19}{'speedup':>9}{'max diff':>10}")
    for count, c in result["cases"].items():
        print(f"{count:>7}{c['branches_ms']:>10.1f}{c['per_label_requests_ms']:>19.1f}{c['speedup']:>8.1f}x"
              f"{c['max_abs_diff_total_logprob']:>10.3g}")
    if not all(c["same_label"] for c in result["cases"].values()):
        sys.exit("the two ways picked different labels")

def prompt_scoring(eng, adapter: str, vocab: int, rng, repeats: int, counts, length: int) -> dict:
    """Prompts scored whole (vLLM's prompt_logprobs, lm-evaluation-harness's echo): through
    the prefill step's graphs (`PrefillStep.hidden`, the default) against the eager prefill
    (engine.PREFILL_STEP off), the same requests in the same process."""
    from tasktune.serve import engine as engine_module
    from tasktune.serve.engine import Request
    from tasktune.serve.sampling import SamplingParams

    out = {"prompt_tokens": length, "cases": {}}
    for n in counts:
        reqs = [Request([rng.randrange(2, vocab) for _ in range(length)], adapter,
                        SamplingParams(max_tokens=0, prompt_logprobs=1)) for _ in range(n)]
        timed = {}
        for label, on in (("graphs", True), ("eager", False)):
            engine_module.PREFILL_STEP = on
            try:
                eng.generate(reqs)  # untimed: captures
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    cs = eng.generate(reqs)
                    times.append(time.perf_counter() - t)
            finally:
                engine_module.PREFILL_STEP = True
            timed[label] = (sorted(times)[len(times) // 2], [lp.logprob for c in cs for lp in c.prompt_logprobs[1:]])
        (tg, lg), (te, le) = timed["graphs"], timed["eager"]
        out["cases"][str(n)] = {"graphs_ms": tg * 1e3, "eager_ms": te * 1e3, "speedup": te / tg,
                                "max_abs_diff_logprob": max(abs(a - b) for a, b in zip(lg, le))}
    return out


if __name__ == "__main__":
    main()
