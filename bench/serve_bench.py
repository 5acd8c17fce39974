"""Serving speed: tasktune's engine against Hugging Face PEFT `generate`, mixed adapters.

Randomly initialised Qwen2.5-0.5B-shaped Qwen2 (hidden 896, intermediate 4864, 24 layers, 14 heads,
2 KV heads, vocab 151936, tied embeddings, rope_theta 1e6), bf16, saved to a temporary folder with a
word-level tokenizer built here (prompts are token ids, so the tokenizer only turns generated ids
back into text, as the engine does every step). 32 random PEFT LoRA adapters, r=16, alpha=32, on
q,k,v,o,gate,up,down (get_peft_model + save_pretrained; lora_A and lora_B random and non-zero).

Work: batch of 32 requests, 256-token random prompts, 128 new tokens, greedy, ignore_eos.
Cases, all in one run:
  base   no adapter
  a4     4 distinct adapters spread over the 32 requests (request i -> adapter i % 4)
  a32    32 distinct adapters (request i -> adapter i)
  peft   HF PEFT `generate(adapter_names=[...])` on the a32 work; decode rate from the
         difference of two generate calls (1 and 1 + n_peft new tokens) since it is slow.

Engine decode throughput = 32 * (decode steps) / (time of the decode steps); the first engine step
is the prefill (all 32 prompts) plus the first token and is timed apart. Memory roofline of one
decode step = bytes it must read (base weights once, the KV cache of the batch at the mean context
length of the decode steps, each distinct adapter's weights once) / device-to-device copy bandwidth
measured here (bytes read + written).

    PYTHONPATH=. python3 bench/serve_bench.py          # on the GPU (writes $OUT too)
    .venv/bin/python bench/serve_bench.py --tiny       # 2 layers, hidden 64, on the CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from common import LORA_TARGETS as TARGETS, copy_bandwidth, device_name, free, fx, model_facts, qwen_config, sync, versions  # noqa: E402
from serve_setup import adapter_bytes, kv_bytes, make_base_and_adapters, model_read_bytes  # noqa: E402
from serve_timing import (StepClock, graph_replay_s, host_profile, print_summary, profile_decode_step,  # noqa: E402
                          profile_last_step, summarise)
from serve_staggered import report, staggered_case  # noqa: E402
from serve_variants import guided_answers, lora_in_launch, main_path, switch, variant_table  # noqa: E402

DESIGN_PEFT = {"no_adapter": 1379, "one_adapter": 394, "8_adapters": 98, "32_adapters": 26}  # ../shared/DESIGN.md, H100

FORMULAS = {
    "decode_tok_s": "batch * decode_steps / decode_time; decode steps = engine steps after the first "
                    "(the first step prefills all prompts and samples the first token); host clock; the "
                    "steps run back to back as in a server loop: the only waits are the engine's own "
                    "(each step reads its tokens; greedy steps launch the next step before that read). "
                    "Up to session 5's H200 run the bench also synced the device after every step, which "
                    "idled the GPU while the host prepared the next step",
    "e2e_tok_s": "batch * new_tokens / (prefill step + decode steps), from submission to the last token",
    "copy_bw": "2 * bytes(src) / time of dst.copy_(src) on the device (bytes read + written), median of repeats",
    "roofline_bytes": "base weights read once per step (every decoder-layer parameter, final norm, LM head; "
                      "embedding rows of the batch only) + KV cache = layers * 2 * kv_heads * head_dim * "
                      "bytes(dtype) * batch * mean_ctx, mean_ctx = prompt_len + (new_tokens) / 2 (the keys "
                      "one decode step attends to, averaged over the decode steps) + each distinct adapter "
                      "once = layers * sum over the 7 modules of r * (d_in + d_out) * bytes(dtype)",
    "roofline_tok_s": "batch / (roofline_bytes / copy_bw)",
    "pct_roofline": "decode_tok_s / roofline_tok_s",
    "peft_decode_tok_s": "batch * n_peft / (t(generate 1 + n_peft new tokens) - t(generate 1 new token))",
    "peft_e2e_tok_s": "batch * (1 + n_peft) / t(generate 1 + n_peft new tokens)",
}


# --- engine cases ----------------------------------------------------------------------------
def run_engine(engine, prompts, adapters, new_tokens: int, device, logprobs: int | None = None,
               choices: list | None = None, temperature: float = 0.0, seeded: bool = False, grammar=None,
               top_k: int = 0, top_p: float | None = None) -> dict:
    """logprobs: every request asks for its tokens' log-probabilities (the logits path);
    choices: each request's answers (guided_choice; token sequences of new_tokens or more);
    grammar: every request bound to it (grammar.py: a regex of new_tokens tokens or more);
    temperature > 0: every request samples (top-p 0.95, or top_k, top_p as given; seeded: request i, seed i)."""
    from dataclasses import replace

    from tasktune.serve.engine import Request, completion_of
    from tasktune.serve.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    seqs = []
    sync(device)
    t0 = time.perf_counter()
    for i, (p, a) in enumerate(zip(prompts, adapters)):
        mine = params if choices is None else replace(params, ignore_eos=False, choices=choices[i])
        mine = mine if grammar is None else replace(mine, ignore_eos=False, grammar=grammar)
        mine = mine if not temperature else replace(mine, temperature=temperature,
                                                    top_p=top_p if top_p is not None else 1.0 if top_k else 0.95,
                                                    top_k=top_k, seed=i if seeded else None)
        seqs.append(engine.submit(Request(prompt=p, adapter=a, params=mine)))
    engine.step()  # admits and prefills every prompt, samples the first token
    sync(device)
    t1 = time.perf_counter()
    if any(len(s.output_ids) != 1 for s in seqs):
        raise RuntimeError("the first step did not prefill every request (raise max_prefill_tokens/max_running)")
    with StepClock() as clock:
        while engine.has_work:  # back to back, as a server loop runs them: no sync but the engine's own
            clock.step(engine.step)
        sync(device)
        t2 = time.perf_counter()
    step_times = clock.steps
    outs = [completion_of(s) for s in seqs]
    assert all(len(o.token_ids) == new_tokens for o in outs), [len(o.token_ids) for o in outs]
    n = len(prompts)
    dec_steps = len(step_times)
    return {
        "prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": dec_steps,
        "decode_step_median_s": statistics.median(step_times) if step_times else None,
        "decode_tok_s": n * dec_steps / (t2 - t1) if dec_steps else None,
        "e2e_tok_s": n * new_tokens / (t2 - t0),
        "tokens": [o.token_ids for o in outs],
        "step_timing": summarise(clock),
    }


# --- PEFT baseline ---------------------------------------------------------------------------
def peft_generate(model, input_ids, names, max_new: int, device) -> tuple[float, torch.Tensor]:
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), adapter_names=names,
                             max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, pad_token_id=0)
    sync(device)
    return time.perf_counter() - t0, out[:, input_ids.shape[1]:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 64, batch 8: a CPU smoke run")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for serve_bench.json (default $OUT)")
    ap.add_argument("--results", default=None, help="also write the JSON here (default bench/results/ on a GPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per engine case (median reported)")
    ap.add_argument("--peft-new", type=int, default=None, help="PEFT decode steps timed (after the first token)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-staggered", action="store_true", help="skip the staggered-lengths case (serve_staggered.py)")
    ap.add_argument("--prefill-max-seqs", type=int, default=None,
                    help="prefill_graphs.MAX_SEQS for the run: the most prompts one prefill graph replay takes")
    ap.add_argument("--gc-compare", action="store_true",
                    help="also time each case with Python's startup heap frozen (gc.freeze), or unfrozen if it was")
    ap.add_argument("--skip-variants", action="store_true", help="skip the eager and torch-LoRA comparison runs")
    ap.add_argument("--variants", default=None,
                    help="comma-separated comparison runs to do (default all: "
                         + ", ".join(variant_table(True, "", "", None, False))
                         + "; any bgmv_<programs>_<expand tile>[_<columns>[_<shrink tile>]] too)")
    ap.add_argument("--profile-variants", default="", help="comma-separated variants whose decode step is also profiled")
    ap.add_argument("--profile-host-variants", default="",
                    help="comma-separated variants whose whole run is also timed under cProfile (host functions)")
    ap.add_argument("--autotune-variant", action="store_true",
                    help="also time the decode step compiled with Inductor's GEMM autotuning (Decoder.compile_decode(autotune=True))")
    ap.add_argument("--no-compile", action="store_true",
                    help="decode step eager (then CUDA graphs); by default it is compiled on a GPU, as `tasktune serve` does")
    args = ap.parse_args()

    tiny = args.tiny
    if args.prefill_max_seqs is not None:
        from tasktune.serve import prefill_graphs
        prefill_graphs.MAX_SEQS = args.prefill_max_seqs
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, prompt_len, new_tokens = (8, 32, 8) if tiny else (32, 256, 128)
    n_adapters, n_few = (8, 4) if tiny else (32, 4)
    repeats = args.repeats or (1 if tiny else 3)
    peft_new = args.peft_new or (3 if tiny else 8)
    r, alpha = 16, 32.0
    dtype = torch.bfloat16

    from tasktune.serve.cuda_graphs import batch_bucket, context_bucket
    from tasktune.serve.engine import Engine

    # the tokenizer's ids: 't0' is EOS and pad; the tiny vocabulary is 4096 words
    config = qwen_config(tiny, eos_token_id=0, bos_token_id=None, pad_token_id=0, **({"vocab_size": 4096} if tiny else {}))
    result: dict = {
        "bench": "serve_bench",
        "device": device_name(device),
        "versions": versions("transformers", "peft"),
        "config": {"tiny": tiny, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "greedy": True,
                   "ignore_eos": True, "dtype": "bfloat16", "lora": {"r": r, "alpha": alpha, "targets": TARGETS},
                   "n_adapters": n_adapters, "few_adapters": n_few, "repeats": repeats, "peft_new_tokens": peft_new,
                   "model": model_facts(config)},
        "formulas": FORMULAS,
        "design_peft_reference_tok_s": DESIGN_PEFT,
    }
    out_dir = Path(args.out) if args.out else None
    results_path = Path(args.results) if args.results else (
        REPO / "bench" / "results" / "serve_bench.json" if device.type == "cuda" else None)

    def save():
        text = json.dumps(result, indent=1)
        for p in ([out_dir / "serve_bench.json"] if out_dir else []) + ([results_path] if results_path else []):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)

    bw = copy_bandwidth(device, (1 << 24) if tiny else (1 << 30))
    result["copy_bandwidth"] = bw
    print(f"device {result['device']}: copy {bw['bytes_per_s'] / 1e12:.3f} TB/s (read+write)", flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="serve_bench_")
    folder = Path(tmp.name)
    t = time.perf_counter()
    base_dir, root, names, peft_model, lora_dtype = make_base_and_adapters(config, folder, n_adapters, r, alpha, device)
    result["setup_s"] = time.perf_counter() - t
    result["peft_lora_dtype"] = str(lora_dtype)
    print(f"setup (base + {n_adapters} adapters saved): {result['setup_s']:.1f}s", flush=True)

    g = torch.Generator().manual_seed(123)
    prompt_ids = torch.randint(2, config.vocab_size, (batch, prompt_len), generator=g)
    prompts = [row.tolist() for row in prompt_ids]

    compile_ = device.type == "cuda" and not args.no_compile
    engine = Engine.from_pretrained(base_dir, adapter_root=root, max_resident=n_adapters, max_rank=r, device=str(device),
                                    dtype=dtype, max_running=batch, max_len=prompt_len + new_tokens + 8,
                                    max_prefill_tokens=batch * prompt_len, compile=compile_)
    result["engine"] = {"cuda_graphs": engine.decode_step.use_graphs, "triton_lora": engine.pool.stacks.kernels,
                        "compile": compile_, "attention_kernel": engine.model.attention_kernel,
                        "linear_kernel": engine.model.linear_kernel}
    engine.pool.register_root()
    sync(device)
    t = time.perf_counter()
    result["cuda_graphs"] = {"captured": engine.warmup()}
    sync(device)
    result["cuda_graphs"]["capture_s"] = time.perf_counter() - t
    result["cuda_graphs"]["prefill_capture_s"] = {str(k): v for k, v in engine.prefill_step.capture_s.items()}
    result["cuda_graphs"]["dynamo_unique_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    print(f"CUDA graphs captured: {result['cuda_graphs']}", flush=True)
    cfg = engine.model.cfg
    elem = torch.finfo(dtype).bits // 8
    base_bytes = model_read_bytes(engine.model, batch)
    mean_ctx = prompt_len + new_tokens / 2
    kvb = kv_bytes(cfg, batch, mean_ctx, elem)
    ab = adapter_bytes(cfg, r, elem)
    result["roofline_parts"] = {"base_weight_bytes": base_bytes, "kv_bytes_mean_ctx": kvb, "mean_ctx": mean_ctx,
                                "adapter_bytes_each": ab}

    cases = {
        "base": [None] * batch,
        f"a{n_few}": [names[i % n_few] for i in range(batch)],
        f"a{n_few}_inlaunch": [names[i % n_few] for i in range(batch)],  # serve_variants.lora_in_launch
        f"a{n_adapters}": [names[i % n_adapters] for i in range(batch)],
    }
    result["cases"] = {}
    # warm-up: every case once with a few tokens (allocator, cuBLAS handles, adapter loads)
    for name, adapters in cases.items():
        lora_in_launch(engine, name)
        run_engine(engine, prompts, adapters, min(4, new_tokens), device)
    for name, adapters in cases.items():
        lora_in_launch(engine, name)
        runs = [run_engine(engine, prompts, adapters, new_tokens, device) for _ in range(repeats)]
        runs.sort(key=lambda x: x["decode_tok_s"])
        med = runs[len(runs) // 2]
        distinct = len({a for a in adapters if a is not None})
        roof_bytes = base_bytes + kvb + distinct * ab
        roof_tok_s = batch / (roof_bytes / bw["bytes_per_s"])
        c = {k: v for k, v in med.items() if k != "tokens"}
        c.update({"distinct_adapters": distinct, "decode_tok_s_all": [x["decode_tok_s"] for x in runs],
                  "roofline_bytes": roof_bytes, "roofline_step_s": roof_bytes / bw["bytes_per_s"],
                  "roofline_tok_s": roof_tok_s, "pct_roofline": med["decode_tok_s"] / roof_tok_s,
                  "repeat_tokens_identical": all(x["tokens"] == runs[0]["tokens"] for x in runs)})
        if engine.decode_step.use_graphs:  # the device's own step, no host between replays
            key = (batch_bucket(batch, engine.cache.num_slots), context_bucket(prompt_len + new_tokens, engine.cache.max_len))
            c["graph_replay_step_s"] = graph_replay_s(engine, *key, engine.decode_step._last_use_lora)
        if args.gc_compare:  # the same runs with Python's startup heap frozen (gc.freeze), or unfrozen if it was
            frozen = gc.get_freeze_count() > 0
            gc.unfreeze() if frozen else (gc.collect(), gc.freeze())
            other = sorted(run_engine(engine, prompts, adapters, new_tokens, device)["decode_tok_s"] for _ in range(repeats))
            gc.freeze() if frozen else gc.unfreeze()
            c["gc_compare"] = {"heap_frozen": not frozen, "decode_tok_s_all": other, "decode_tok_s": other[len(other) // 2]}
        if name == "base":
            c["last_step_profile"] = profile_last_step(engine, prompts, adapters, new_tokens)
            print("  last step:", ", ".join(f"{r['function']} {r['own_ms']:.2f} ms/{r['calls']}"
                                            for r in c["last_step_profile"]["by_own_time"][:8]), flush=True)
        result["cases"][name] = c
        result.setdefault("_tokens", {})[name] = med["tokens"]
        st = c["step_timing"]
        print(f"  steps: median {st['p50_ms']:.3f} ms, mean {st['mean_ms']:.3f}, max {st['max_ms']:.2f}, host busy "
              f"{st['host_busy_median_ms']:.3f}, graph replay {fx(c.get('graph_replay_step_s'), '.6f')} s, gc "
              f"{st['gc_collections_by_generation']}, gc compare {c.get('gc_compare', {}).get('decode_tok_s')}", flush=True)
        print(f"{name}: decode {c['decode_tok_s']:.0f} tok/s (step {c['decode_step_median_s'] * 1e3:.2f} ms), "
              f"e2e {c['e2e_tok_s']:.0f} tok/s, prefill {c['prefill_s'] * 1e3:.0f} ms, "
              f"{100 * c['pct_roofline']:.1f}% of roofline {roof_tok_s:.0f} tok/s", flush=True)
        save()
    if not args.skip_staggered:  # lengths spread, more requests than slots (serve_staggered.py)
        st = result["staggered"] = staggered_case(engine, prompts, cases[f"a{n_few}"], new_tokens, device, repeats)
        print(report(st, f"a{n_few}"), flush=True)
        save()
    if device.type == "cuda":
        try:
            result["profile"] = {k: profile_decode_step(engine, prompts, cases[k], device) for k in ("base", f"a{n_adapters}")}
            for case, prof in result["profile"].items():
                print(f"profile of one {case} decode step: {prof['kernels']} kernels, "
                      f"{prof['kernel_time_s'] * 1e3:.2f} ms of device time", flush=True)
                for k in prof["top_kernels"]:
                    print(f"  {k['time_us']:>8.1f} us {k['count']:>5}x  {k['name']}", flush=True)
        except Exception as e:  # diagnostics only
            result["profile"] = {"error": f"{type(e).__name__}: {e}"}
    if device.type == "cuda" and not args.skip_variants:  # what each piece buys, on the same work
        main = main_path(engine)
        variants = variant_table(main.kernels, f"a{n_few}", f"a{n_adapters}", args.variants, args.autotune_variant)
        for label, (graphs, use_kernels, names_) in variants.items():
            if label == "graphs_torch_lora" and not main.kernels:
                continue  # the main run already used torch LoRA
            switch(engine, main, label, graphs, use_kernels)
            lp = int(label[8:] or 0) if label.startswith("logprobs") else None  # logprobs<k>: k alternatives
            answers = {name: guided_answers(result["_tokens"][name], engine.model.cfg.vocab_size)
                       for name in names_} if label == "guided" else {}
            temperature = 0.8 if label.startswith("sampled") or label.endswith("_sampled") else 0.0
            seeded, top_k, top_p = label == "sampled_seeded", 50 if label == "sampled_top_k" else 0, None
            if label == "sampled_top_k_top_p":  # Qwen2.5's generation defaults
                temperature, top_k, top_p = 0.7, 20, 0.8
            # guided_regex: every token of the bench's vocabulary is 't<id>', so this allows any
            # token but the end token ('t0') until new_tokens of them
            grammar = engine.grammars.regex(f"(t[0-9]+){{{new_tokens}}}") if label.startswith("guided_regex") else None
            works = {name: (engine, prompts, cases[name], new_tokens, device, lp, answers.get(name), temperature, seeded,
                            grammar, top_k, top_p) for name in names_}
            for work in works.values():  # an untimed run captures the graphs this work uses (2, not all 56: ~1 s, not ~28)
                run_engine(*work)
            for name, work in works.items():
                other = run_engine(*work)
                c = result["cases"][name]
                c[f"{label}_decode_tok_s"] = other["decode_tok_s"]
                c[f"{label}_tokens_equal"] = other["tokens"] == result["_tokens"][name]
                c[f"{label}_step_timing"] = timing = other["step_timing"]
                print(f"{name} {label}: decode {other['decode_tok_s']:.0f} tok/s, tokens equal the main run: "
                      f"{c[f'{label}_tokens_equal']}, step / host busy p50 {timing.get('p50_ms', 0):.3f} / "
                      f"{timing.get('host_busy_median_ms', 0):.3f} ms", flush=True)
                if label in args.profile_host_variants.split(","):  # the run again, under cProfile
                    prof = c[f"{label}_host_profile"] = host_profile(lambda: run_engine(*work), top=25)
                    print("  host: " + ", ".join(f"{f['function']} {f['own_ms']:.0f} ms/{f['calls']}"
                                                for f in prof["by_own_time"][:10]), flush=True)
                if label in args.profile_variants.split(","):
                    prof = c[f"{label}_profile"] = profile_decode_step(engine, prompts, cases[name], device, temperature)
                    print(f"  profile: {prof['kernels']} kernels, {prof['kernel_time_s'] * 1e3:.2f} ms of device time; "
                          + ", ".join(f"{k['name'][:28]} {k['time_us']:.0f} us/{k['count']}x"
                                      for k in prof["top_kernels"][:5]), flush=True)
        switch(engine, main)
    a_tokens = result.pop("_tokens")
    del engine
    free()
    save()

    # PEFT mixed-adapter generate on the many-adapter work
    if not args.skip_peft:
        try:
            ids = prompt_ids.to(device)
            adapters = cases[f"a{n_adapters}"]
            peft_generate(peft_model, ids, adapters, 2, device)  # warm-up
            t1 = min(peft_generate(peft_model, ids, adapters, 1, device)[0] for _ in range(2))
            tn, toks = peft_generate(peft_model, ids, adapters, 1 + peft_new, device)
            if tn < 30:  # a second timing when it is cheap; keep the faster one
                tn = min(tn, peft_generate(peft_model, ids, adapters, 1 + peft_new, device)[0])
            ours = a_tokens[f"a{n_adapters}"]
            k = 1 + peft_new
            agree = sum(ours[i][:k] == toks[i].tolist() for i in range(batch)) / batch
            first = sum(ours[i][0] == int(toks[i, 0]) for i in range(batch)) / batch
            p = {"t_generate_1_s": t1, f"t_generate_{k}_s": tn, "new_tokens_timed": peft_new,
                 "decode_tok_s": batch * peft_new / (tn - t1), "e2e_tok_s": batch * k / tn,
                 "greedy_agreement_first_token": first, f"greedy_agreement_first_{k}_tokens": agree,
                 "lora_dtype": str(lora_dtype)}
            result["peft_a32"] = p
            print(f"peft {n_adapters} adapters: decode {p['decode_tok_s']:.1f} tok/s, e2e ({k} tokens) "
                  f"{p['e2e_tok_s']:.1f} tok/s; greedy agreement with ours: first token {first:.2f}, "
                  f"first {k} {agree:.2f}", flush=True)
        except Exception as e:
            result["peft_a32"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            print("peft failed:", result["peft_a32"]["error"], flush=True)

    cs = result["cases"]
    base_c, few_c, many_c = cs["base"], cs[f"a{n_few}"], cs[f"a{n_adapters}"]
    peft_dec = result.get("peft_a32", {}).get("decode_tok_s")
    result["ratios"] = {
        f"a{n_few}_vs_base_decode": {"value": few_c["decode_tok_s"] / base_c["decode_tok_s"], "target": ">= 0.9"},
        "base_pct_roofline": {"value": base_c["pct_roofline"], "target": ">= 0.30"},
        f"a{n_adapters}_pct_roofline": {"value": many_c["pct_roofline"], "target": ">= 0.30"},
        f"ours_vs_peft_a{n_adapters}_decode": {"value": many_c["decode_tok_s"] / peft_dec if peft_dec else None,
                                              "target": ">= 100"},
    }
    for v in result["ratios"].values():
        v["met"] = None if v["value"] is None else v["value"] >= float(v["target"].split()[-1])
    save()
    tmp.cleanup()

    print_summary(result, batch, prompt_len, new_tokens, bw["bytes_per_s"], n_adapters)


if __name__ == "__main__":
    main()
