"""Training speed: tasktune's Runner against Hugging Face PEFT, on a Qwen2.5-0.5B-shaped model.

Randomly initialised Qwen2 (hidden 896, intermediate 4864, 24 layers, 14 heads, 2 KV
heads, vocab 151936, tied embeddings, rope_theta 1e6, bf16 weights); LoRA r=16, alpha=32
on q,k,v,o,gate,up,down; AdamW. Three cases, every number measured in the same run:

1. dense: 8 x 1024 random tokens, every position labelled. Ours = Runner with plan
   `multi` (one adapter); PEFT = get_peft_model + model(input_ids, labels=...) +
   backward + step, both without and with bf16 autocast (a plain loop, and what HF
   Trainer(bf16=True) does). tokens/s and MFU.
2. DU mixture: the built-in tasks clinc150, snips_intent, snips_slots, circa, dialogsum
   (train splits, shuffled together, rendered with their templates), tokenised with a
   byte-level BPE trained here on the bundled texts (no Qwen tokenizer offline). Ours
   packs each batch (Runner.collate(pack=True)); PEFT pads the same examples to the
   longest. Effective (non-padding) tokens/s.
3. `single` (one adapter per task, 4 tasks in every batch) vs `multi` on the same packed
   batches of clinc150, snips_intent, snips_slots, circa: step-time ratio.

Before timing, our loss is compared with PEFT's on the same batch, at step 0 and after
AdamW steps from identical LoRA weights. --profile: where a step's time goes
(common.profile_steps); --compile: our blocks compiled; --cuda-graphs: our steps replayed
as CUDA graphs (train/graphed_step.py). Runs: bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from common import (  # noqa: E402
    H100_BF16_PEAK, bpe_tokenizer, device_name, free, fx, guarded, matmul_peak, model_facts, pick_device, print_table,
    profile_steps, qwen_config, random_causal_lm, ratio, time_steps, versions, write_json,
)

from train_setup import (  # noqa: E402
    DU_TASKS, IGNORE, SINGLE_TASKS, TARGETS, Setup, check_text, compile_warmup, copy_peft_lora_into_ours, dense_batch,
    graph_counts, load_du, loss_check, make_optimizer, make_peft, make_runner, max_memory, mixture, ours_optimizer,
    ours_step_fn, padded_batch, profile_rows,
    peft_step_fn, reset_memory, step_flops,
)

FLOP_FORMULA = (
    "per step: sum over non-padding tokens of [2*P_lin (fwd) + 2*P_lin (bwd, activation grads of "
    "the frozen base)] + sum over labelled positions of [2*d*V (fwd) + 2*d*V (bwd)] for the LM head "
    "+ sum over adapted layers and tokens of 6*r*(d_in+d_out) (LoRA: fwd 2, bwd activation 2, "
    "weight 2) + attention: per layer 4*d_attn*pairs (fwd: QK^T and PV) and 8*d_attn*pairs (bwd), "
    "pairs = sum over examples of l*(l+1)/2 (causal, each example alone; padding and "
    "cross-example pairs are not counted). P_lin = the 24 layers' linear weights (q,k,v,o,"
    "gate,up,down), d*V = the tied LM head. The same useful-work count is used for ours and "
    "PEFT, so MFU compares useful work per second. MFU = flops / time / peak."
)


# --- cases -----------------------------------------------------------------------------------
def dense_case(s: Setup) -> tuple[dict, list[tuple[str, str]]]:
    """1. dense B x T random tokens, every position labelled: ours (`multi`) vs PEFT."""
    device, config = s.device, s.config
    g = torch.Generator().manual_seed(1)
    dense_ids = [torch.randint(0, config.vocab_size, s.dense_shape, generator=g) for _ in range(2)]
    B, T = s.dense_shape
    flops = s_flops = step_flops(config, [T] * B, B * (T - 1), s.r)
    tokens = B * T
    res: dict = {"tokens_per_step": tokens, "flops_per_step": s_flops}

    ours = make_runner(s, "multi", SINGLE_TASKS, T, max(T, s.pack_tokens))
    peft_model = make_peft(copy.deepcopy(s.pristine), s.r, s.alpha)
    copy_peft_lora_into_ours(peft_model, ours)
    ours_opt = ours_optimizer(s, ours.trainable_parameters())
    peft_opt = make_optimizer([p for p in peft_model.parameters() if p.requires_grad], s.lr)
    ours_step = ours_step_fn(ours, ours_opt, device, graphs=s.cuda_graphs)
    ours_batches = [dense_batch(x) for x in dense_ids]
    peft_batches = [{"input_ids": x, "labels": x.clone()} for x in dense_ids]
    res["loss_check_vs_peft_plain"] = guarded(loss_check, ours_step, peft_step_fn(peft_model, peft_opt, device, False),
                                              ours_batches[0], peft_batches[0], [ours_opt, peft_opt], s.check_steps)
    print(f"dense loss check: {res['loss_check_vs_peft_plain']}", flush=True)

    res["ours"] = time_steps(ours_step, ours_batches, s.warmup, s.steps, device)
    res["ours"]["cuda_graphs"] = graph_counts(ours_step)
    max_memory(res["ours"], device)
    if s.profile:
        res["ours"]["profile"] = guarded(profile_steps, ours_step, ours_batches, device)
    del ours, ours_opt, ours_step
    free()
    for mode in ("plain", "autocast"):
        reset_memory(device)
        step = peft_step_fn(peft_model, peft_opt, device, mode == "autocast")
        res[f"peft_{mode}"] = guarded(time_steps, step, peft_batches, s.warmup, s.steps, device)
        max_memory(res[f"peft_{mode}"], device)
        if s.profile and mode == "autocast" and "error" not in res[f"peft_{mode}"]:
            res[f"peft_{mode}"]["profile"] = guarded(profile_steps, step, peft_batches, device)
    del peft_model, peft_opt, step
    free()
    for k in ("ours", "peft_plain", "peft_autocast"):
        if "error" in res[k]:
            res[k]["tokens_per_s"] = 0.0
            res[k]["mfu"] = 0.0
            continue
        res[k]["tokens_per_s"] = tokens / res[k]["median_s"]
        res[k]["mfu"] = flops / res[k]["median_s"] / s.peak
        if s.peak_measured:
            res[k]["fraction_of_measured_matmul"] = flops / res[k]["median_s"] / s.peak_measured
    best_peft = max(("peft_plain", "peft_autocast"), key=lambda k: res[k]["tokens_per_s"])
    res["peft_best"] = best_peft
    res["speedup_vs_peft_best"] = ratio(res["ours"]["tokens_per_s"], res[best_peft]["tokens_per_s"])
    res["speedup_vs_peft_plain"] = ratio(res["ours"]["tokens_per_s"], res["peft_plain"]["tokens_per_s"])
    res["target"] = ">= 2x PEFT"
    table = [
        ("dense ours tok/s (MFU)", f"{res['ours']['tokens_per_s']:,.0f} ({res['ours']['mfu']:.1%})"),
        ("dense PEFT plain tok/s (MFU)", f"{res['peft_plain']['tokens_per_s']:,.0f} ({res['peft_plain']['mfu']:.1%})"),
        ("dense PEFT autocast tok/s (MFU)", f"{res['peft_autocast']['tokens_per_s']:,.0f} ({res['peft_autocast']['mfu']:.1%})"),
        ("dense speedup vs best PEFT (>=2x)", f"{fx(res['speedup_vs_peft_best'], '.2f')}x"),
        ("dense loss ours/PEFT step0, step1", check_text(res["loss_check_vs_peft_plain"])),
    ]
    table += profile_rows("dense", res, ("ours", "peft_autocast"))
    return res, table


def du_case(s: Setup) -> tuple[dict, list[tuple[str, str]]]:
    """2. the DU mixture: ours packed vs PEFT padded to the longest, effective tokens/s."""
    device, config, warmup, steps, du_batch = s.device, s.config, s.warmup, s.steps, s.du_batch
    mix = mixture(s.examples, DU_TASKS, s.seed)
    n_batches = warmup + steps
    groups = [mix[i * du_batch:(i + 1) * du_batch] for i in range(n_batches)]
    ours = make_runner(s, "multi", DU_TASKS, s.max_length, s.pack_tokens)
    t0 = time.perf_counter()
    ours_batches = [ours.collate(gr, pack=True) for gr in groups]
    collate_s = (time.perf_counter() - t0) / len(groups)
    peft_batches, lens_all, n_lab = [], [], []
    for gr in groups:
        pb, lens, enc = padded_batch(s.tokenizer, s.tasks, gr, s.max_length, s.seed)
        peft_batches.append(pb)
        lens_all.append(lens)
        n_lab.append(sum(sum(1 for x in e.labels if x != IGNORE) for e in enc))
    eff = [sum(ls) for ls in lens_all]
    padded = [pb["input_ids"].numel() for pb in peft_batches]
    packed = [b.input_ids.numel() for b in ours_batches]
    flops = [step_flops(config, ls, nl, s.r) for ls, nl in zip(lens_all, n_lab)]
    res = {
        "tasks": DU_TASKS, "examples_per_step": du_batch,
        "mix_share_examples": {n: sum(1 for ex in mix if ex.task == n) / len(mix) for n in DU_TASKS},
        "effective_tokens_per_step_mean": sum(eff) / len(eff),
        "peft_padded_tokens_per_step_mean": sum(padded) / len(padded),
        "ours_packed_tokens_per_step_mean": sum(packed) / len(packed),
        "ours_rows_per_step_mean": sum(b.input_ids.shape[0] for b in ours_batches) / len(ours_batches),
        "ours_packed_shapes": sorted({tuple(b.input_ids.shape) for b in ours_batches}),
        "ours_collate_s_per_batch_cpu": collate_s,
    }
    peft_model = make_peft(copy.deepcopy(s.pristine), s.r, s.alpha)
    copy_peft_lora_into_ours(peft_model, ours)
    ours_opt = ours_optimizer(s, ours.trainable_parameters())
    peft_opt = make_optimizer([p for p in peft_model.parameters() if p.requires_grad], s.lr)
    ours_step = ours_step_fn(ours, ours_opt, device, graphs=s.cuda_graphs)
    res["loss_check_vs_peft_plain"] = guarded(loss_check, ours_step, peft_step_fn(peft_model, peft_opt, device, False),
                                              ours_batches[0], peft_batches[0], [ours_opt, peft_opt], s.check_steps)
    print(f"DU loss check: {res['loss_check_vs_peft_plain']}", flush=True)
    if device.type == "cuda":
        t0 = time.perf_counter()
        for b in ours_batches:
            b.to(device)
        torch.cuda.synchronize()
        res["ours_batch_h2d_s_per_batch"] = (time.perf_counter() - t0) / len(ours_batches)

    def per_batch_rates(timed):
        # every batch is used once in the timed window (n_batches = warmup + steps)
        if "error" in timed:
            timed.update(effective_tokens_per_s=0.0, mfu=0.0)
            return timed
        t = timed["times_s"]
        used = list(range(warmup, warmup + steps))
        timed["effective_tokens_per_s"] = sum(eff[i] for i in used) / sum(t)
        timed["mfu"] = sum(flops[i] for i in used) / sum(t) / s.peak
        if s.peak_measured:
            timed["fraction_of_measured_matmul"] = sum(flops[i] for i in used) / sum(t) / s.peak_measured
        return timed

    res["ours_compile_warmup_s"] = compile_warmup(s, ours_step, ours_batches)
    res["ours"] = per_batch_rates(time_steps(ours_step, ours_batches, warmup, steps, device))
    res["ours"]["cuda_graphs"] = graph_counts(ours_step)
    res["ours"]["loss_first_last"] = [res["ours"]["losses"][0], res["ours"]["losses"][-1]]
    max_memory(res["ours"], device)
    if s.profile:
        res["ours"]["profile"] = guarded(profile_steps, ours_step, ours_batches[warmup:], device)

    def large_batch():
        # ours alone at 8x the examples per step (pad-to-longest PEFT would not fit):
        # what packing does with a batch that fills the GPU
        big_n = du_batch * 8
        start = n_batches * du_batch
        big = [mix[start + i * big_n:start + (i + 1) * big_n] for i in range(warmup + steps)]
        big = [g for g in big if len(g) == big_n]
        bb = [ours.collate(g, pack=True) for g in big]
        compile_s = compile_warmup(s, ours_step, bb)
        timed = time_steps(ours_step, bb, warmup, len(bb) - warmup, device)
        timed["cuda_graphs"] = graph_counts(ours_step)
        eff_b = [int(b_.attention_mask.sum()) for b_ in bb]
        fl = []
        for g in big:
            _, ls, enc = padded_batch(s.tokenizer, s.tasks, g, s.max_length, s.seed)
            fl.append(step_flops(config, ls, sum(sum(1 for x in e.labels if x != IGNORE) for e in enc), s.r))
        timed["examples_per_step"] = big_n
        timed["compile_warmup_s"] = compile_s
        timed["effective_tokens_per_step_mean"] = sum(eff_b) / len(eff_b)
        timed["effective_tokens_per_s"] = sum(eff_b[warmup:]) / sum(timed["times_s"])
        timed["mfu"] = sum(fl[warmup:]) / sum(timed["times_s"]) / s.peak
        return timed

    res["ours_large"] = guarded(large_batch)
    res["ours_large"].setdefault("examples_per_step", du_batch * 8)
    del ours, ours_opt, ours_step
    free()
    for mode in ("plain", "autocast"):
        reset_memory(device)
        step = peft_step_fn(peft_model, peft_opt, device, mode == "autocast")
        res[f"peft_{mode}"] = per_batch_rates(guarded(time_steps, step, peft_batches, warmup, steps, device))
        max_memory(res[f"peft_{mode}"], device)
        if s.profile and mode == "autocast" and "error" not in res[f"peft_{mode}"]:
            res[f"peft_{mode}"]["profile"] = guarded(profile_steps, step, peft_batches[warmup:], device)
    del peft_model, peft_opt, step
    free()
    best_peft = max(("peft_plain", "peft_autocast"), key=lambda k: res[k]["effective_tokens_per_s"])
    res["peft_best"] = best_peft
    res["speedup_vs_peft_best"] = ratio(res["ours"]["effective_tokens_per_s"], res[best_peft]["effective_tokens_per_s"])
    res["speedup_vs_peft_plain"] = ratio(res["ours"]["effective_tokens_per_s"], res["peft_plain"]["effective_tokens_per_s"])
    res["target"] = ">= 4x PEFT (effective tokens/s)"
    table = [
        ("DU ours packed eff tok/s (MFU)", f"{res['ours']['effective_tokens_per_s']:,.0f} ({res['ours']['mfu']:.1%})"),
        ("DU PEFT padded plain eff tok/s", f"{res['peft_plain']['effective_tokens_per_s']:,.0f} ({res['peft_plain']['mfu']:.1%})"),
        ("DU PEFT padded autocast eff tok/s", f"{res['peft_autocast']['effective_tokens_per_s']:,.0f} ({res['peft_autocast']['mfu']:.1%})"),
        ("DU speedup vs best PEFT (>=4x)", f"{fx(res['speedup_vs_peft_best'], '.2f')}x"),
        ("DU tokens/step eff | padded | packed", f"{res['effective_tokens_per_step_mean']:.0f} | {res['peft_padded_tokens_per_step_mean']:.0f} | {res['ours_packed_tokens_per_step_mean']:.0f}"),
        ("DU loss ours/PEFT step0, step1", check_text(res["loss_check_vs_peft_plain"])),
        (f"DU ours packed, {res['ours_large']['examples_per_step']} examples/step", f"{fx(res['ours_large'].get('effective_tokens_per_s'), ',.0f')} eff tok/s ({fx(res['ours_large'].get('mfu'), '.1%')})"),
        ("DU ours loss first -> last timed", f"{res['ours']['loss_first_last'][0]:.3f} -> {res['ours']['loss_first_last'][1]:.3f}"),
    ]
    table += profile_rows("DU", res, ("ours", "peft_autocast"))
    return res, table


def single_case(s: Setup) -> tuple[dict, list[tuple[str, str]]]:
    """3. `single` (4 adapters) vs `multi` on the same packed batches: step-time ratio."""
    mix = mixture(s.examples, SINGLE_TASKS, s.seed + 1)
    batch_n = s.du_batch * 2
    groups = [mix[i * batch_n:(i + 1) * batch_n] for i in range(s.warmup + s.steps)]
    res = {"tasks": SINGLE_TASKS, "examples_per_step": batch_n}
    for strategy in ("multi", "single"):
        runner = make_runner(s, strategy, SINGLE_TASKS, s.max_length, s.pack_tokens)
        batches = [runner.collate(gr, pack=True) for gr in groups]
        opt = ours_optimizer(s, runner.trainable_parameters())
        step = ours_step_fn(runner, opt, s.device, graphs=s.cuda_graphs)
        compile_s = compile_warmup(s, step, batches)
        timed = time_steps(step, batches, s.warmup, s.steps, s.device)
        timed["cuda_graphs"] = graph_counts(step)
        timed["compile_warmup_s"] = compile_s
        timed["total_timed_s"] = sum(timed["times_s"])
        timed["adapters"] = len(runner.plan.adapters)
        timed["effective_tokens_per_s"] = sum(int(b.attention_mask.sum()) for b in batches[s.warmup:]) / timed["total_timed_s"]
        timed["tasks_per_batch_mean"] = sum(len(set(b.row_tasks)) for b in batches) / len(batches)
        res[strategy] = timed
        del runner, opt, batches, step
        free()
    res["single_over_multi_time"] = res["single"]["total_timed_s"] / res["multi"]["total_timed_s"]
    # the same over median step times: one slow step (a recompile, an allocator stall) moves the total
    res["single_over_multi_median"] = res["single"]["median_s"] / res["multi"]["median_s"]
    res["target"] = "<= 1.3x"
    table = [
        ("single(4)/multi step time (<=1.3x)", f"{res['single_over_multi_time']:.3f}x (medians {res['single_over_multi_median']:.3f}x)"),
        ("multi | single eff tok/s", f"{res['multi']['effective_tokens_per_s']:,.0f} | {res['single']['effective_tokens_per_s']:,.0f}"),
    ]
    return res, table


# --- main ------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 64: a CPU smoke run")
    ap.add_argument("--smoke", action="store_true", help="--tiny with little data, 2 steps: seconds on a CPU")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for train_bench.json (default $OUT)")
    ap.add_argument("--results", default=str(REPO / "bench" / "results" / "train_bench.json"),
                    help="also written here, on full-size runs only")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--du-batch", type=int, default=None, help="examples per step (DU and single/multi cases)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--pack-tokens", type=int, default=2048)
    ap.add_argument("--pack-multiple", type=int, default=None,
                    help="packed rows padded to a multiple of this (default: the Runner's; 1 = to the longest row)")
    ap.add_argument("--per-task", type=int, default=None, help="train examples per task (before mixing)")
    ap.add_argument("--cases", default="dense,du,single", help="comma-separated subset of dense,du,single")
    ap.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="torch.compile our blocks (Runner.compile_blocks) with BACKEND (default inductor)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="our steps as CUDA graphs, one per batch shape (tasktune/train/graphed_step.py)")
    ap.add_argument("--profile", action="store_true", help="also profile a few steps of ours and PEFT (autocast)")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    from tasktune.model.batches import PACK_MULTIPLE

    tiny = args.tiny or args.smoke
    device = pick_device()
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    steps = args.steps if args.steps is not None else (2 if tiny else 10)
    du_batch = args.du_batch or (4 if args.smoke else 8 if tiny else 32)
    per_task = args.per_task or (40 if args.smoke else 150 if tiny else 4000)
    dense_shape = (2, 64) if args.smoke else (2, 128) if tiny else (8, 1024)
    pack_multiple = args.pack_multiple or PACK_MULTIPLE
    r, alpha, lr, seed = 16, 32.0, 1e-4, 0
    cases = set(args.cases.split(","))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # PEFT's fp32 LoRA products stay fp32, as a user gets them

    config = qwen_config(tiny)
    result: dict = {
        "bench": "train_bench",
        "device": device_name(device),
        "versions": versions("transformers", "peft"),
        "config": {
            "tiny": tiny, "smoke": args.smoke, "model": model_facts(config),
            "rope": getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None),
            "weights_dtype": "bfloat16", "attn_implementation": "sdpa",
            "lora": {"r": r, "alpha": alpha, "dropout": 0.0, "targets": TARGETS},
            "optimizer": f"torch.optim.AdamW(lr={lr}, weight_decay=0), default (foreach) implementation, both",
            "ours_precision": "bf16 base, fp32 LoRA master weights (PEFT's default dtypes), forward under "
                              "torch.autocast(bf16): LoRA products in bf16",
            "peft_precision": "bf16 base, fp32 LoRA weights (PEFT autocast_adapter_dtype default); 'plain' = no "
                              "autocast (PEFT casts x to fp32 for the LoRA product), 'autocast' = torch.autocast(bf16) "
                              "as HF Trainer(bf16=True) does",
            "warmup_steps": warmup, "timed_steps": steps, "timing": "median of per-step host times, device synced "
                                                                       "around each step; batch transfer included",
            "dense_batch": list(dense_shape), "du_batch_examples": du_batch, "max_length": args.max_length,
            "pack_tokens": args.pack_tokens, "pack_multiple": pack_multiple, "ours_compile": args.compile, "ours_cuda_graphs": args.cuda_graphs,
            "per_task_train_examples": per_task, "seed": seed,
        },
        "flops_formula": FLOP_FORMULA,
    }
    peak_measured = matmul_peak(device)
    result["matmul_bf16_8192_flops_per_s"] = peak_measured
    result["mfu_peak_flops_per_s"] = H100_BF16_PEAK
    v = result["versions"]
    print(f"device: {result['device']}  torch {v['torch']}  transformers {v['transformers']}  peft {v['peft']}", flush=True)
    if peak_measured:
        print(f"bf16 8192^3 matmul: {peak_measured / 1e12:.0f} TFLOP/s", flush=True)

    t0 = time.perf_counter()
    pristine = random_causal_lm(config, device, seed).train()
    result["build_model_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tasks, examples = load_du(per_task, seed)
    from tasktune.tasks.render import render

    texts = []
    for n in DU_TASKS:
        for ex in examples[n]:
            rd = render(tasks[n], ex, seed)
            texts.append(rd.prompt + " " + rd.target)
    tokenizer = bpe_tokenizer(texts, 4000 if tiny else 32000)
    result["tokenizer"] = (f"byte-level BPE (HF tokenizers), vocab {tokenizer.vocab_size}, trained in this run on the "
                           f"rendered train texts of {', '.join(DU_TASKS)} ({len(texts)} examples); EOS = pad = "
                           "<|endoftext|>, no BOS")
    result["data_prep_s"] = time.perf_counter() - t0
    print(f"data + tokenizer: {result['data_prep_s']:.1f}s, {len(texts)} texts, vocab {tokenizer.vocab_size}", flush=True)

    setup = Setup(
        device=device, config=config, pristine=pristine, tokenizer=tokenizer, tasks=tasks, examples=examples,
        warmup=warmup, steps=steps, du_batch=du_batch, dense_shape=dense_shape, max_length=args.max_length,
        pack_tokens=args.pack_tokens, pack_multiple=pack_multiple, compile=args.compile, profile=args.profile,
        check_steps=2 if args.smoke else 6, peak=H100_BF16_PEAK, peak_measured=peak_measured, r=r, alpha=alpha,
        lr=lr, seed=seed, cuda_graphs=args.cuda_graphs,
    )
    table: list[tuple[str, str]] = []
    for name, key, run in (("dense", "dense", dense_case), ("du", "du", du_case), ("single", "single_vs_multi", single_case)):
        if name in cases:
            res, rows = run(setup)
            result[key] = res
            table += rows
            print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, default=str), flush=True)

    written = write_json(result, "train_bench.json", folders=[args.out], files=[args.results if not tiny else None])
    print("wrote: " + ", ".join(written) if written else "(no JSON written: --tiny without --out)")
    print_table(f"train bench on {result['device']}", table)


if __name__ == "__main__":
    main()
