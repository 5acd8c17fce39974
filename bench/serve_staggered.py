"""The serve bench's staggered case: requests of different lengths, more than fit at once.

The main cases start a batch together and finish it together, so a decode step never has
a row at its last token while others go on, and no request waits for a slot. Served
traffic does both all the time. Here 2 x batch greedy requests with max_tokens spread
over [new_tokens / 2, new_tokens] (adapters as the case gives them) are submitted at once
to an engine of `batch` slots: rows finish on different steps and the waiting requests
take their slots and join the running batch, each arrival a prefill step of its own
unless several arrive together. Timed on the main path and, on the same work in the same
run, without steps ahead past a row's last token (`engine.AHEAD_PER_ROW`; session 13's
engine launched nothing ahead in such a step) and with every prefill eager
(`engine.PREFILL_STEP`; session 14 replays one sequence's prefill from a CUDA graph,
session 15 up to 8 at once). Prefill alone: one request's prefill step, a burst of
`batch` arrivals (with graphs, eager, and with the graphs' LoRA through the BGMV pair
instead of the segmented pair, `decoder_lora.PREFILL_SGMV`).
"""
from __future__ import annotations

import time

import torch

from common import sync
from serve_timing import kernel_summary, profiled


def lengths(n: int, new_tokens: int) -> list[int]:
    """n max_tokens spread over [new_tokens / 2, new_tokens], interleaved (a fixed pattern)."""
    lo = new_tokens // 2
    return [lo + (i * 37) % (new_tokens - lo + 1) for i in range(n)]


def run_staggered(engine, prompts: list, adapters: list, new_tokens: int, device) -> dict:
    """Every request to completion -> tokens/s from the first step to the last, the decode
    steps launched ahead that were used and discarded, and each request's tokens."""
    from tasktune.serve.engine import Request, completion_of
    from tasktune.serve.sampling import SamplingParams

    n = 2 * len(prompts)
    sizes = lengths(n, new_tokens)
    step = engine.decode_step
    used, wasted = step.ahead_used, step.ahead_wasted
    sync(device)
    t0 = time.perf_counter()
    seqs = [engine.submit(Request(prompt=prompts[i % len(prompts)], adapter=adapters[i % len(adapters)],
                                  params=SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)))
            for i, m in enumerate(sizes)]
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    sync(device)
    wall = time.perf_counter() - t0
    outs = [completion_of(s) for s in seqs]
    assert [len(o.token_ids) for o in outs] == sizes
    return {"requests": n, "tokens": sum(sizes), "engine_steps": steps, "wall_s": wall, "tok_s": sum(sizes) / wall,
            "steps_ahead_used": step.ahead_used - used, "steps_ahead_wasted": step.ahead_wasted - wasted,
            "token_ids": [o.token_ids for o in outs]}


def prefill_one(engine, prompt: list, adapter) -> None:
    """An engine step that prefills one request (max_tokens 1: it ends there)."""
    from tasktune.serve.engine import Request
    from tasktune.serve.sampling import SamplingParams

    engine.submit(Request(prompt=prompt, adapter=adapter, params=SamplingParams(max_tokens=1, ignore_eos=True)))
    engine.step()


def median_ms(run, device, repeats: int) -> float:
    """Median wall time of run() over `repeats` runs after a first that warms up, in ms."""
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times[1:])[repeats // 2]


def prefill_ms(engine, prompt: list, adapter, device, repeats: int = 5) -> float:
    """Median wall time of `prefill_one`."""
    return median_ms(lambda: prefill_one(engine, prompt, adapter), device, repeats)


def burst_ms(engine, prompts: list, adapters: list, device, repeats: int = 3) -> float:
    """Median wall time from submitting len(prompts) requests at once (max_tokens 1) to
    their end: a burst of arrivals' prefill."""
    from tasktune.serve.engine import Request
    from tasktune.serve.sampling import SamplingParams

    def burst() -> None:
        for i, p in enumerate(prompts):
            engine.submit(Request(prompt=p, adapter=adapters[i % len(adapters)],
                                  params=SamplingParams(max_tokens=1, ignore_eos=True)))
        while engine.has_work:
            engine.step()

    return median_ms(burst, device, repeats)


def profile_prefill(engine, prompt: list, adapter, device) -> dict:
    """One request's prefill step under the profiler (serve_timing.kernel_summary): where an
    arrival's time to first token goes."""
    prefill_one(engine, prompt, adapter)
    return kernel_summary(*profiled(lambda: prefill_one(engine, prompt, adapter), device), top=10)


# what each setting changes: (engine.AHEAD_PER_ROW, engine.PREFILL_STEP)
SETTINGS = {"main": (True, True), "no_ahead_past_last_token": (False, True), "eager_prefill": (True, False)}


def staggered_case(engine, prompts: list, adapters: list, new_tokens: int, device, repeats: int) -> dict:
    """The staggered work on the main path and with one setting changed at a time (SETTINGS;
    median of `repeats` each, the settings alternating), whether all gave the same tokens,
    and the wall time of one request's prefill step, with an adapter and without."""
    from tasktune.serve import decoder_lora, engine as engine_module

    def setting(label: str) -> None:
        engine_module.AHEAD_PER_ROW, engine_module.PREFILL_STEP = SETTINGS[label]

    runs: dict[str, list[dict]] = {label: [] for label in SETTINGS}
    prefill: dict[str, float] = {}
    run_staggered(engine, prompts, adapters, min(8, new_tokens), device)  # warm-up
    try:
        for _ in range(repeats):
            for label in SETTINGS:
                setting(label)
                runs[label].append(run_staggered(engine, prompts, adapters, new_tokens, device))
        for label in ("main", "eager_prefill"):
            setting(label)
            prefill[f"{label}_adapter_ms"] = prefill_ms(engine, prompts[0], adapters[0], device)
            prefill[f"{label}_no_adapter_ms"] = prefill_ms(engine, prompts[0], None, device)
            prefill[f"{label}_burst_{len(prompts)}_ms"] = burst_ms(engine, prompts, adapters, device)
        setting("main")
        if torch.cuda.is_available():
            prefill["profile_adapter"] = profile_prefill(engine, prompts[0], adapters[0], device)
            prefill["profile_no_adapter"] = profile_prefill(engine, prompts[0], None, device)
            decoder_lora.PREFILL_SGMV = False  # the graphs' LoRA through the BGMV pair (session 14), captured anew
            engine.prefill_step.reset()
            prefill["bgmv_prefill_adapter_ms"] = prefill_ms(engine, prompts[0], adapters[0], device)
            prefill[f"bgmv_prefill_burst_{len(prompts)}_ms"] = burst_ms(engine, prompts, adapters, device)
    finally:
        setting("main")
        if not decoder_lora.PREFILL_SGMV:
            decoder_lora.PREFILL_SGMV = True
            engine.prefill_step.reset()
    med = {k: sorted(v, key=lambda r: r["tok_s"])[len(v) // 2] for k, v in runs.items()}
    out = {label: {k: v for k, v in m.items() if k != "token_ids"} for label, m in med.items()}
    out["tok_s_all"] = {label: [r["tok_s"] for r in v] for label, v in runs.items()}
    out["tokens_equal"] = {label: m["token_ids"] == med["main"]["token_ids"] for label, m in med.items()}
    out["speedup"] = {label: med["main"]["tok_s"] / m["tok_s"] for label, m in med.items() if label != "main"}
    out["prefill_one_request_ms"] = prefill
    return out


def report(st: dict, case: str) -> str:
    """`staggered_case`'s result as the lines the serve bench prints."""
    lines = [f"staggered {case}: " + "; ".join(
        f"{k} {st[k]['tok_s']:.0f} tok/s (ahead used/discarded {st[k]['steps_ahead_used']}/"
        f"{st[k]['steps_ahead_wasted']}, tokens equal {st['tokens_equal'][k]})" for k in SETTINGS)
        + "; prefill of one request " + ", ".join(f"{k} {v:.1f}" for k, v in st["prefill_one_request_ms"].items()
                                                  if not k.startswith("profile"))]
    for k, prof in st["prefill_one_request_ms"].items():
        if k.startswith("profile"):
            lines.append(f"  {k}: {1e3 * prof['wall_s_profiled']:.2f} ms, {prof['kernels']} kernels, "
                         f"{1e3 * prof['kernel_time_s']:.2f} ms "
                         "of device time; " + ", ".join(f"{t['name'][:40]} {t['time_us']:.0f} us/{t['count']}x"
                                                        for t in prof["top_kernels"][:6]))
    return "\n".join(lines)
