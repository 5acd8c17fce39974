"""The serve bench's staggered case: requests of different lengths, more than fit at once.

The main cases start a batch together and finish it together, so a decode step never has
a row at its last token while others go on, and no request waits for a slot. Served
traffic does both all the time. Here 2 x batch greedy requests with max_tokens spread
over [new_tokens / 2, new_tokens] (adapters as the case gives them) are submitted at once
to an engine of `batch` slots: rows finish on different steps and the waiting requests
take their slots and join the running batch. Timed with the engine's steps ahead past a
row's last token (`engine.AHEAD_PER_ROW`, the main path) and without (session 13's
engine: such a step launched nothing ahead), on the same work in the same run.
"""
from __future__ import annotations

import time

from common import sync


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


def staggered_case(engine, prompts: list, adapters: list, new_tokens: int, device, repeats: int) -> dict:
    """The staggered work with and without steps ahead past a row's last token (median of
    `repeats` each, alternating), and whether both gave the same tokens."""
    from tasktune.serve import engine as engine_module

    runs: dict[bool, list[dict]] = {True: [], False: []}
    run_staggered(engine, prompts, adapters, min(8, new_tokens), device)  # warm-up
    try:
        for _ in range(repeats):
            for per_row in (True, False):
                engine_module.AHEAD_PER_ROW = per_row
                runs[per_row].append(run_staggered(engine, prompts, adapters, new_tokens, device))
    finally:
        engine_module.AHEAD_PER_ROW = True
    med = {k: sorted(v, key=lambda r: r["tok_s"])[len(v) // 2] for k, v in runs.items()}
    out = {"main": {k: v for k, v in med[True].items() if k != "token_ids"},
           "no_ahead_past_last_token": {k: v for k, v in med[False].items() if k != "token_ids"},
           "tok_s_all": {"main": [r["tok_s"] for r in runs[True]],
                         "no_ahead_past_last_token": [r["tok_s"] for r in runs[False]]},
           "tokens_equal": med[True]["token_ids"] == med[False]["token_ids"]}
    out["speedup"] = med[True]["tok_s"] / med[False]["tok_s"]
    return out
