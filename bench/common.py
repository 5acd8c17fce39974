"""What every benchmark here shares: the model, the device facts, the clock and the JSON.

- The model: a randomly initialised Qwen2 shaped like Qwen2.5-0.5B (../shared/DESIGN.md:
  hidden 896, intermediate 4864, 24 layers, 14 heads, 2 KV heads, vocab 151936, tied
  embeddings, rope_theta 1e6), or a 2-layer, hidden-64 one of the same family for CPU
  smoke runs. LoRA r=16 on every linear layer of a block (`LORA_TARGETS`).
- The device: which one, its name, library versions, its measured bf16 matmul rate.
- The clock: per-step host time with the device synced around each step (what a user
  waits for), and a profile of a few steps that says where that time goes (device
  busy time, host ops, kernel launches, host-device syncs).
- The output: one JSON per benchmark, to $OUT and, for full-size runs, bench/results/.

A script in bench/ imports it as `common` (Python puts the script's own folder first on
sys.path).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
H100_BF16_PEAK = 989.4e12  # dense bf16 tensor-core peak of an H100 SXM (datasheet)

# Qwen2.5-0.5B's shapes (../shared/DESIGN.md) and a CPU-sized model of the same family.
QWEN_0_5B_SHAPE = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768,
)
TINY_SHAPE = dict(
    vocab_size=8192, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048,
)


# --- model -----------------------------------------------------------------------------------
def qwen_config(tiny: bool, **overrides):
    """A Qwen2Config with Qwen2.5-0.5B's shapes (or the tiny ones), tied embeddings,
    rope_theta 1e6, sdpa attention; `overrides` replace any field (e.g. vocab_size,
    eos_token_id)."""
    from transformers import Qwen2Config

    fields = dict(TINY_SHAPE if tiny else QWEN_0_5B_SHAPE)
    fields.update(tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, attn_implementation="sdpa")
    fields.update(overrides)
    return Qwen2Config(**fields)


def bpe_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE trained on `texts` (no Qwen tokenizer offline); EOS = pad =
    <|endoftext|>, no BOS, like Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def model_facts(config) -> dict:
    """The shape fields a result records about its model."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "tie_word_embeddings")
    return {k: getattr(config, k) for k in keys}


def random_causal_lm(config, device, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """Qwen2ForCausalLM(config), initialised from `seed` directly on `device`, in `dtype`."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to(dtype)


def linear_shapes(config) -> list[tuple[int, int]]:
    """(d_in, d_out) of the seven linear layers of one block, in LORA_TARGETS order."""
    d, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    return [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]


# --- device ----------------------------------------------------------------------------------
def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def versions(*packages: str) -> dict[str, str]:
    """torch's version, then each named package's, then Python's (and CUDA's if any)."""
    import importlib

    out = {"torch": torch.__version__}
    for name in packages:
        out[name] = importlib.import_module(name).__version__
    out["python"] = platform.python_version()
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def copy_bandwidth(device: torch.device, n: int = 1 << 30) -> dict:
    """Device-to-device copy of n bytes (read + written), median of 10 after 3 warm-ups:
    the bandwidth a memory-bound step can hope for on this device."""
    src = torch.randn(n // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            dst.copy_(src)
            e1.record()
            e1.synchronize()
            dt = e0.elapsed_time(e1) / 1e3
        else:
            dst.copy_(src)
            dt = time.perf_counter() - t0
        if i >= 3:
            times.append(dt)
    med = statistics.median(times)
    assert torch.equal(dst, src)
    del src, dst
    return {"bytes_src": n, "median_s": med, "bytes_per_s": 2 * n / med, "repeats": len(times)}


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """fn() captured as one CUDA graph, after two warm-up calls on a side stream."""
    side = torch.cuda.Stream()  # warm-up (Triton compiles, cuBLAS picks kernels) off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_graph(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """Median seconds of one replay (a pair of CUDA events each), after 3 untimed ones."""
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    """Collect what the caller has just `del`-ed and return the cached device memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def matmul_peak(device: torch.device, n: int = 8192) -> float | None:
    """Measured bf16 n^3 matmul rate in FLOP/s (None off the GPU)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (start.elapsed_time(end) / 1e3)


# --- clock -----------------------------------------------------------------------------------
def time_steps(step: Callable, batches: Sequence, warmup: int, steps: int, device: torch.device) -> dict:
    """Run `warmup` untimed then `steps` timed steps cycling over batches; per-step times
    (host clock after a device sync each step) and what each step returned."""
    losses, times = [], []
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        loss = step(b)
        sync(device)
        dt = time.perf_counter() - t0
        losses.append(loss)
        if i >= warmup:
            times.append(dt)
    times_sorted = sorted(times)
    med = times_sorted[len(times) // 2]
    return {"median_s": med, "min_s": times_sorted[0], "max_s": times_sorted[-1], "times_s": times, "losses": losses}


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def profile_steps(step: Callable, batches: Sequence, device: torch.device, steps: int = 3, top: int = 12) -> dict:
    """Where a step's time goes, over `steps` steps under torch.profiler (after the caller's
    warm-up). Per step: wall time (inflated by the profiler itself), device busy time (sum
    of kernel times), host ops (aten::*), kernel launches and host-device syncs (CUDA
    runtime calls; the step's own loss read counts as one); and the top ops by host time
    and the top kernels by device time. A step whose wall time is far above its device
    time is bound by the host."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            step(batches[i % len(batches)])
        sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # kernels and copies

    def count(names) -> float:
        return sum(e.count for e in events if e.key in names) / steps

    def rows(ranked, key) -> list:
        return [[e.key[:90], e.count // steps, round(key(e) / steps / 1e3, 3)] for e in ranked[:top] if key(e) > 0]

    def host_us(e) -> float:
        return e.self_cpu_time_total

    def device_us(e) -> float:
        return e.self_device_time_total

    return {
        "steps": steps,
        "wall_ms_per_step_profiled": wall / steps * 1e3,
        "device_busy_ms_per_step": sum(map(device_us, kernels)) / steps / 1e3 if device.type == "cuda" else None,
        "host_ops_per_step": sum(e.count for e in events if e.key.startswith("aten::")) / steps,
        "kernel_launches_per_step": count(LAUNCH_CALLS),
        "syncs_per_step": count(SYNC_CALLS),
        "top_host_ms": rows(sorted(events, key=host_us, reverse=True), host_us),
        "top_device_ms": rows(sorted(kernels, key=device_us, reverse=True), device_us),
        "columns": ["op or kernel", "calls per step", "self ms per step"],
    }


def profile_text(p: dict) -> str:
    """One line from a profile_steps result (or its error)."""
    if "error" in p:
        return p["error"]
    busy = fx(p["device_busy_ms_per_step"], ".1f")
    return (f"wall {p['wall_ms_per_step_profiled']:.1f} ms (profiled), device busy {busy} ms, "
            f"{p['host_ops_per_step']:.0f} host ops, {p['kernel_launches_per_step']:.0f} launches, "
            f"{p['syncs_per_step']:.1f} syncs")


def guarded(fn: Callable, *a):
    """fn(*a), or {"error": ...} when it fails (e.g. out of memory on a padded batch)."""
    try:
        return fn(*a)
    except torch.cuda.OutOfMemoryError as exc:
        free()
        return {"error": f"OutOfMemoryError: {str(exc).splitlines()[0]}"}
    except RuntimeError as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}


def ratio(a, b):
    return a / b if b else None


def fx(v, spec: str) -> str:
    """Format a number that may be missing (a failed variant)."""
    return format(v, spec) if isinstance(v, (int, float)) else "n/a"


# --- output ----------------------------------------------------------------------------------
def write_json(
    result: dict, name: str, folders: Sequence[str | Path | None] = (), files: Sequence[str | Path | None] = ()
) -> list[str]:
    """Write `result` (indent 2, non-JSON values as str) as folders/<name> and to each of
    `files`; None entries are skipped. Returns the paths written."""
    text = json.dumps(result, indent=2, default=str)
    paths = [Path(f) / name for f in folders if f] + [Path(f) for f in files if f]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return [str(p) for p in paths]


def print_table(title: str, table: list[tuple[str, str]]) -> None:
    print(f"\n=== {title} ===")
    width = max((len(k) for k, _ in table), default=0)
    for k, v in table:
        print(f"{k:<{width}}  {v}")


def kernel_bench_args(doc: str, add: Callable[[argparse.ArgumentParser], None] | None = None
                      ) -> tuple[argparse.Namespace, torch.device]:
    """The decode kernel benches' command line: --smoke (the CPU, Triton's interpreter, tiny
    shapes), --out (default $OUT) and `add`'s options -> (args, the device to run on)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    if add is not None:
        add(ap)
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return args, torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")


def timed_graph(fn, device: torch.device, replays: int) -> float:
    """Median seconds of one replay of a CUDA graph of fn(); on the CPU (a smoke run under the
    Triton interpreter) one plain call, timed."""
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return time_graph(capture_graph(fn), replays)
