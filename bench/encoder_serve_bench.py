"""Encoder serving: does micro-batching across tasks pay on the product's default model?

`tasktune serve` on an encoder run (MiniLM-L6 with one adapter and head per task) answers
`/v1/tasks/{task}/predict`; concurrent requests for different tasks meet in one forward,
each row through its own task's adapter and head (serve/encoder_engine.py). This times,
on one run and in one process:
- the engine alone: a request at a time (the baseline), then batches of up to
  --max-batch requests mixing the tasks (requests/s and the ratio to the baseline);
- the HTTP server (uvicorn on loopback, as `tasktune serve` runs it) at concurrency
  1 / 8 / 64: requests/s, p50 / p99 latency, every answer equal to the engine's own.

The run is --run (e.g. runs/demo/single after `make demo`), else one trained here for
--train-steps steps on CLINC150 + SNIPS (intent, slots) subsets: the timing does not
depend on how well it was trained. Writes bench/results/encoder_serve_<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from serve_load import start_server  # noqa: E402

from tasktune.serve.encoder_engine import EncoderEngine  # noqa: E402

TEXTS = ["what is my bank balance", "play the latest album by daft punk on spotify",
         "book a table for two at an italian place near the station tonight", "will it rain tomorrow in boston",
         "add this song to my workout playlist", "how do i reset the pin of my debit card"]


def train_run(out: Path, steps: int) -> Path:
    from tasktune.config import config_from_dict
    from tasktune.train.run import train_strategy

    cfg = config_from_dict({
        "model": "minilm", "seed": 0, "max_length": 64,
        "tasks": [{"builtin": t, "max_examples": {"train": 256, "validation": 32, "test": 32}}
                  for t in ("clinc150", "snips_intent", "snips_slots")],
        "lora": {"r": 8, "alpha": 16}, "train": {"batch_size": 32, "max_steps": steps, "log_every": 1},
    })
    train_strategy(cfg, "single", out, progress=False)
    return out


def per_second(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


async def http_load(port: int, jobs: list[tuple[str, str]], concurrency: int, want: dict) -> dict:
    import httpx

    sem, lat, wrong = asyncio.Semaphore(concurrency), [], 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one(task: str, text: str) -> None:
            nonlocal wrong
            async with sem:
                t = time.perf_counter()
                r = await client.post(f"http://127.0.0.1:{port}/v1/tasks/{task}/predict", json={"inputs": text})
                lat.append(time.perf_counter() - t)
                wrong += r.status_code != 200 or r.json()["prediction"] != want[task, text]

        t0 = time.perf_counter()
        await asyncio.gather(*[one(task, text) for task, text in jobs])
        wall = time.perf_counter() - t0
    lat.sort()
    return {"concurrency": concurrency, "requests": len(jobs), "req_s": len(jobs) / wall, "wrong_or_failed": wrong,
            "p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="an encoder run folder (default: train one here)")
    ap.add_argument("--train-steps", type=int, default=2)
    ap.add_argument("--requests", type=int, default=192, help="requests a case")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--results", type=Path, help="JSON path (default bench/results/encoder_serve_<device>.json)")
    args = ap.parse_args()

    run = args.run or train_run(Path(tempfile.mkdtemp(prefix="tasktune-enc-")) / "run", args.train_steps)
    engine = EncoderEngine.from_run(run, device=args.device, max_batch=args.max_batch)
    tasks = list(engine.tasks)
    jobs = [(tasks[i % len(tasks)], TEXTS[i % len(TEXTS)]) for i in range(args.requests)]
    examples = [engine.example(task, text) for task, text in jobs]
    engine.predict(examples[: args.max_batch])  # warm-up
    want = {(t, x): a.value for (t, x), a in zip(jobs, engine.predict(examples))}
    alone = per_second(lambda: [engine.predict([e]) for e in examples], len(examples))
    batched = per_second(lambda: engine.predict(examples), len(examples))
    rows = [("engine, a request at a time", alone, 1.0), (f"engine, mixed batches of {args.max_batch}", batched,
                                                          batched / alone)]

    from tasktune.serve.encoder_api import create_encoder_app

    server, thread, port = start_server(create_encoder_app(engine))
    try:
        http = [asyncio.run(http_load(port, jobs, c, want)) for c in (1, 8, 64)]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    for h in http:
        rows.append((f"HTTP, concurrency {h['concurrency']} (p50 {h['p50_ms']:.1f} / p99 {h['p99_ms']:.1f} ms)",
                     h["req_s"], h["req_s"] / alone))

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    result = {"bench": "encoder_serve", "device": device, "host": platform.node(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "run": str(args.run or f"trained here, {args.train_steps} steps"),
              "tasks": tasks, "adapters": engine.adapters, "requests": args.requests, "max_batch": args.max_batch,
              "engine_req_s": {"alone": alone, "batched": batched, "speedup": batched / alone}, "http": http}
    out = args.results or REPO / "bench" / "results" / f"encoder_serve_{'cuda' if args.device == 'cuda' else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nencoder serving, {device}, {len(tasks)} tasks ({', '.join(tasks)}), {args.requests} requests a case")
    for name, rate, x in rows:
        print(f"  {name:<58} {rate:8.1f} req/s  {x:5.2f}x")
    print(f"wrong or failed HTTP answers: {sum(h['wrong_or_failed'] for h in http)}; JSON: {out}")


if __name__ == "__main__":
    main()
