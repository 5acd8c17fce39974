"""Where a served decode step's wall time goes, beside serve_bench's tok/s: host or device.

The bench's decode tok/s is host clock over the whole loop, so it holds everything: the
graphs' device time, gaps between them, host stalls (a garbage collection, the engine's
own per-step Python) and a few slow steps. These split it up:
- `StepClock`: each engine step's wall time, and how much of it the host spent blocked
  in the event wait for the step's tokens (the rest is host work while the GPU runs
  ahead); Python's collections by generation during the loop.
- `summarise`: percentiles of the steps and the slowest few with their index (the mean
  over the median says how much a handful of outliers cost).
- `graph_replay_s`: one bucket's CUDA graph replayed back to back with nothing between,
  timed by CUDA events: the device's own step time, no host in it.
- `profile_last_step`: the host functions of the step in which every sequence finishes
  (the slowest step of a run: nothing is launched ahead of it); `host_profile` those of
  any call (a variant's whole run).
- `profiled` / `kernel_summary`: one call under torch's profiler -> its wall time, the
  device kernels it launched, their summed time and the top ones (`profile_decode_step`).
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch

SLOWEST = 6  # summarise lists the slowest steps, with their index in the loop
FIRST_KERNELS = 24  # a decode step's profile lists its first kernels in launch order (what one layer runs)
TOP_KERNELS = 14  # ... and the kernels that take most of its device time


class StepClock:
    """Times engine steps and the host's waits inside them (torch.cuda.Event.synchronize:
    the decode step waits on an event for its tokens)."""

    def __init__(self):
        self.steps: list[float] = []
        self.waits: list[float] = []
        self._wait = 0.0
        self._orig = None
        self._gc0 = None

    def __enter__(self) -> "StepClock":
        self._orig = orig = torch.cuda.Event.synchronize
        clock = self

        def timed(event):
            t = time.perf_counter()
            orig(event)
            clock._wait += time.perf_counter() - t

        torch.cuda.Event.synchronize = timed
        self._gc0 = [s["collections"] for s in gc.get_stats()]
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.Event.synchronize = self._orig
        self.collections = [s["collections"] - c for s, c in zip(gc.get_stats(), self._gc0)]

    def step(self, fn) -> None:
        self._wait = 0.0
        t = time.perf_counter()
        fn()
        self.steps.append(time.perf_counter() - t)
        self.waits.append(self._wait)


def summarise(clock: StepClock) -> dict:
    """Step wall times (ms) by percentile, the slowest with their index, host busy time
    (step minus its wait) and the collections the loop ran."""
    s = clock.steps
    if not s:
        return {}
    ordered = sorted(s)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3  # noqa: E731
    busy = [a - w for a, w in zip(s, clock.waits)]
    slow = sorted(range(len(s)), key=lambda i: -s[i])[:SLOWEST]
    return {
        "steps": len(s), "mean_ms": statistics.fmean(s) * 1e3, "min_ms": ordered[0] * 1e3, "p10_ms": pick(0.1),
        "p50_ms": pick(0.5), "p90_ms": pick(0.9), "max_ms": ordered[-1] * 1e3,
        "excess_over_median_ms": (sum(s) - len(s) * statistics.median(s)) * 1e3,
        "slowest": [{"index": i, "ms": s[i] * 1e3, "wait_ms": clock.waits[i] * 1e3} for i in slow],
        "host_busy_median_ms": statistics.median(busy) * 1e3, "host_busy_max_ms": max(busy) * 1e3,
        "gc_collections_by_generation": getattr(clock, "collections", None),
    }


def graph_replay_s(engine, B: int, L: int, use_lora: bool, replays: int = 50) -> float | None:
    """Median time of one replay of the (B, L, use_lora) bucket's graph, replays back to
    back (the inputs are whatever the last step left, the rows' adapters included, but no
    row's position moves on: 150 replays would carry the last rows past the cache's end).
    None if that graph was never captured."""
    step = engine.decode_step
    key = (B, L, use_lora)
    if key not in step.graphs:
        return None
    step.drop_ahead()
    step._active.zero_()  # positions stay where the last step left them: replays rewrite those KV entries only
    graph = step.graphs[key][0]
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / replays)
    return statistics.median(times)


def profile_last_step(engine, prompts, adapters, new_tokens: int, top: int = 20) -> dict:
    """One run of the work with the final engine step (every sequence finishes in it) under
    cProfile: where the host time of that step goes -> its wall time and the functions with
    the most time of their own."""
    from tasktune.serve.engine import Request
    from tasktune.serve.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    seqs = [engine.submit(Request(prompt=p, adapter=a, params=params)) for p, a in zip(prompts, adapters)]
    out: dict = {}
    while engine.has_work:
        if all(len(s.output_ids) == new_tokens - 1 for s in seqs):
            out = host_profile(engine.step, top)
        else:
            engine.step()
    return out


def host_profile(fn, top: int = 20) -> dict:
    """fn() under cProfile -> its wall time and the functions with the most time of their own."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    wall_ms = (time.perf_counter() - t) * 1e3
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, ncalls, tottime, cumtime, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return {"wall_ms": wall_ms, "by_own_time": [{"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "calls": v[1],
                                                  "own_ms": v[2] * 1e3, "cum_ms": v[3] * 1e3} for k, v in rows]}


def profiled(fn, device) -> tuple[object, float]:
    """fn() under torch's profiler (CPU and CUDA activity), synced -> (profile, wall seconds)."""
    from torch.profiler import ProfilerActivity, profile

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    return prof, wall


def kernel_summary(prof, wall: float, top: int = TOP_KERNELS, first: int = 0) -> dict:
    """A profile's device kernels: how many, their summed time, the `top` by time and the
    `first` in launch order, beside the profiled call's wall time (how busy the GPU was)."""
    kernels, busy_us, timeline = 0, 0.0, []
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            kernels += 1
            busy_us += e.device_time if hasattr(e, "device_time") else e.cuda_time
            timeline.append((e.time_range.start, e.name[:60]))
    ranked = sorted(((e.key, e.count, getattr(e, "device_time_total", 0.0)) for e in prof.key_averages()
                     if getattr(e, "device_time_total", 0.0) > 0), key=lambda k: -k[2])[:top]
    out = {"wall_s_profiled": wall, "kernels": kernels, "kernel_time_s": busy_us / 1e6,
           "top_kernels": [{"name": n[:90], "count": c, "time_us": round(t, 1)} for n, c, t in ranked]}
    if first:
        out["first_kernels"] = [name for _, name in sorted(timeline)[:first]]
    return out


def profile_decode_step(engine, prompts, adapters, device, temperature: float = 0.0) -> dict:
    """One decode step under the profiler (`kernel_summary`, with the step's first kernels);
    temperature > 0: of requests that sample (top-p 0.95)."""
    from tasktune.serve.engine import Request
    from tasktune.serve.sampling import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=temperature, top_p=0.95 if temperature else 1.0, ignore_eos=True)
    for p, a in zip(prompts, adapters):
        engine.submit(Request(prompt=p, adapter=a, params=params))
    engine.step()
    engine.step()
    prof, wall = profiled(engine.step, device)
    while engine.has_work:
        engine.step()
    return kernel_summary(prof, wall, first=FIRST_KERNELS)


def print_summary(result: dict, batch: int, prompt_len: int, new_tokens: int, bytes_per_s: float,
                  n_adapters: int) -> None:
    """The serve bench's closing table: each case's rates against its roofline, PEFT, the ratios."""
    from common import fx

    print()
    print(f"serve bench on {result['device']}: batch {batch}, prompt {prompt_len}, {new_tokens} new tokens, "
          f"copy bw {bytes_per_s / 1e12:.2f} TB/s")
    print(f"{'case':<12}{'decode tok/s':>14}{'e2e tok/s':>12}{'step ms':>10}{'roof tok/s':>12}{'% roof':>8}")
    for name, c in result["cases"].items():
        print(f"{name:<12}{c['decode_tok_s']:>14.0f}{c['e2e_tok_s']:>12.0f}{c['decode_step_median_s'] * 1e3:>10.2f}"
              f"{c['roofline_tok_s']:>12.0f}{100 * c['pct_roofline']:>7.1f}%")
    peft_dec = result.get("peft_a32", {}).get("decode_tok_s")
    if peft_dec:
        p = result["peft_a32"]
        print(f"{'peft a' + str(n_adapters):<12}{peft_dec:>14.1f}{p['e2e_tok_s']:>12.1f}{1e3 * batch / peft_dec:>10.1f}")
    for k, v in result["ratios"].items():
        met = "met" if v["met"] else "MISSED" if v["met"] is not None else "n/a"
        print(f"  {k}: {fx(v['value'], '.3f')} (target {v['target']}: {met})")
