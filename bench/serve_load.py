"""Load test of the HTTP server: many greedy requests over many adapters, checked for exactness.

Starts the server as a user does, `tasktune serve ADAPTER_DIR... --base MODEL --port P`, in
a process of its own on 127.0.0.1 (the tiny test Llama unless --model is given), sends
--requests completions over --adapters adapters at --concurrency with httpx.AsyncClient,
and checks every answer against an engine in this process answering the same request
alone (once per distinct prompt/adapter). Reports lost requests, errors, mismatches,
p50/p99 latency and throughput, and from the server's /metrics its adapter disk loads and
decode steps launched ahead; writes JSON to --out.

    .venv/bin/python bench/serve_load.py --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import torch  # noqa: E402

from tasktune.serve.engine import Engine, Request  # noqa: E402
from tasktune.serve.sampling import SamplingParams  # noqa: E402

PROMPTS = [
    "book a table for two",
    "play the latest album by the beatles on spotify",
    "what is the weather in paris tomorrow",
    "add this song to my workout playlist",
    "rate this book five stars",
    "summarize the dialogue between person1 and person2",
    "classify the intent of the following utterance: play music",
    "yes no maybe",
]
CLIENT_CONNECTIONS = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(work: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import tiny_llama_dir

    return tiny_llama_dir(work)


def make_adapters(base_dir: Path, root: Path, n: int, rank: int = 4) -> list[str]:
    """n PEFT adapters with random non-zero weights, from one PeftModel re-randomised per save."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0))
    names = []
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.15 if "lora_A" in name else 0.08))
        model.save_pretrained(root / f"adapter-{i:03d}")
        names.append(f"adapter-{i:03d}")
    return names


def start_server(model: Path, adapters: list[Path], args, log: Path) -> tuple[subprocess.Popen, int]:
    """`tasktune serve` on a free port, its output into `log`; returns once /health answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = shutil.which("tasktune", path=str(Path(sys.executable).parent)) or shutil.which("tasktune")
    if exe is None:
        raise SystemExit("serve_load: no `tasktune` command (pip install -e .)")
    cmd = [exe, "serve", *map(str, adapters), "--base", str(model), "--port", str(port), "--device", args.device,
           "--max-num-seqs", str(args.max_running), "--max-loras", str(args.max_resident), "--max-lora-rank", "16",
           "--max-model-len", "256", "--max-waiting", str(args.concurrency * 2)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve_load: `tasktune serve` exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"serve_load: the server did not answer /health within 300 s:\n{log.read_text()[-3000:]}")


def server_counts(port: int) -> dict:
    """The server's adapter disk loads and decode steps launched ahead (used, wasted), from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text

    def value(name: str) -> int:
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return int(float(m.group(1))) if m else 0

    return {"disk_loads": value("tasktune_adapter_disk_loads"),
            "ahead_used": value('tasktune_decode_steps_ahead{outcome="used"}'),
            "ahead_wasted": value('tasktune_decode_steps_ahead{outcome="wasted"}')}


async def load(port: int, jobs: list[tuple[str, str]], refs: dict, args) -> dict:
    """Concurrency is spread over clients of CLIENT_CONNECTIONS connections each: one httpx
    pool of 256 connections tops out near 85 req/s on its own pool bookkeeping."""
    sem, lat, statuses, lost, mismatches = asyncio.Semaphore(args.concurrency), [], {}, 0, 0
    lost_kinds: dict[str, int] = {}
    per = min(CLIENT_CONNECTIONS, args.concurrency)
    limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
    deadline = time.monotonic() + args.time_limit
    sent = tokens = 0

    async def one(clients: list[httpx.AsyncClient], i: int, prompt: str, adapter: str) -> None:
        nonlocal lost, mismatches, sent, tokens
        async with sem:
            if time.monotonic() > deadline:
                return
            sent += 1
            body = {"model": adapter, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
            t0 = time.monotonic()
            try:
                r = await clients[i % len(clients)].post("/v1/completions", json=body)
            except httpx.HTTPError as e:
                lost += 1
                lost_kinds[type(e).__name__] = lost_kinds.get(type(e).__name__, 0) + 1
                return
            lat.append(time.monotonic() - t0)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                out = r.json()
                tokens += out["usage"]["completion_tokens"]
                mismatches += out["choices"][0]["text"] != refs[(prompt, adapter)]

    n_clients = -(-args.concurrency // per)
    clients = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=300)
               for _ in range(n_clients)]
    try:
        t0 = time.monotonic()
        await asyncio.gather(*(one(clients, i, p, a) for i, (p, a) in enumerate(jobs)))
        wall = time.monotonic() - t0
    finally:
        for c in clients:
            await c.aclose()
    lat.sort()
    q = lambda f: round(lat[min(len(lat) - 1, int(f * len(lat)))], 4) if lat else None  # noqa: E731
    ok = statuses.get(200, 0)
    return {
        "sent": sent, "ok": ok, "lost": lost, "lost_kinds": lost_kinds, "errors": sent - ok - lost, "status_counts": statuses,
        "mismatches": mismatches, "wall_s": round(wall, 2), "requests_per_s": round(ok / wall, 1),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "latency_s": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(lat[-1], 4) if lat else None},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a Hugging Face decoder folder (default: the tiny test Llama)")
    ap.add_argument("--adapter-root", type=Path, help="folder of PEFT adapters (default: make --adapters random ones)")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-running", type=int, default=64)
    ap.add_argument("--max-resident", type=int, default=64)
    ap.add_argument("--time-limit", type=float, default=900, help="stop sending new requests after this many s")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_load_cpu.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tasktune-load-"))
    model = args.model or tiny_model(work)
    root = args.adapter_root or work / "adapters"
    t0 = time.monotonic()
    names = sorted(d.name for d in root.iterdir()) if args.adapter_root else make_adapters(model, root, args.adapters)
    names = names[: args.adapters]
    engine = Engine.from_pretrained(model, adapter_root=root, max_resident=args.max_resident, max_rank=16,
                                    max_running=args.max_running, max_waiting=args.concurrency * 2, max_len=256,
                                    device=args.device)
    for n in names:
        engine.pool.register(n, n)
    setup_s = time.monotonic() - t0

    rng = random.Random(0)
    jobs = [(rng.choice(PROMPTS), rng.choice(names)) for _ in range(args.requests)]
    t0 = time.monotonic()
    refs = {}
    for key in sorted(set(jobs)):  # each distinct request alone: batch of one
        c = engine.generate([Request(key[0], key[1], SamplingParams(max_tokens=args.max_tokens))])[0]
        refs[key] = c.text
    ref_s = time.monotonic() - t0

    del engine  # the references are done: the server is another process
    t0 = time.monotonic()
    proc, port = start_server(model, [root / n for n in names], args, work / "server.log")
    start_s = time.monotonic() - t0
    try:
        before = server_counts(port)
        result = asyncio.run(load(port, jobs, refs, args))
        after = server_counts(port)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    result = {
        "bench": "serve_load", "device": args.device, "host": platform.node(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "model": str(args.model or "tiny-llama (tests/tiny_models.py)"),
        "requests": args.requests, "adapters": len(names), "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "max_running": args.max_running, "max_resident": args.max_resident,
        "distinct_requests": len(refs), "setup_s": round(setup_s, 1), "reference_s": round(ref_s, 1),
        "server": "tasktune serve (a process of its own)", "server_start_s": round(start_s, 1),
        "adapter_disk_loads": after["disk_loads"],
        # greedy decode steps launched one ahead during the load: taken, or discarded (the batch changed)
        "steps_ahead_used": after["ahead_used"] - before["ahead_used"],
        "steps_ahead_wasted": after["ahead_wasted"] - before["ahead_wasted"], **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if result["lost"] or result["mismatches"] or result["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
