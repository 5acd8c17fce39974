"""Operations per decode step: tasktune's serving decoder against Hugging Face (+ PEFT).

On the GPU a decode step of a 0.5B model at batch 32 is bound by kernel launches, not by
bytes: the H100 profile in serve_bench.json counted 1,105 kernels per step, most of them
small elementwise ones. This counts the ATen operations one decode step dispatches (each
one a kernel launch on the GPU, views excluded) on the CPU, where it can run in CI-sized
time, for the same Qwen2 weights in bf16, batch 8, context 64:

- ours: `Decoder.decode` (the step the engine captures in a CUDA graph), without adapters
  and with 4 distinct adapters through the torch LoRA path (the GPU uses Triton kernels:
  2 launches per adapted linear);
- Hugging Face: `Qwen2ForCausalLM` forward of one new token per row with its KV cache;
  PEFT: the same with 4 LoRA adapters mixed in the batch (`adapter_names=`).

    .venv/bin/python bench/decode_ops.py            # seconds; writes results/decode_ops.json
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from common import LORA_TARGETS, device_name, print_table, qwen_config, random_causal_lm, versions, write_json  # noqa: E402

VIEWS = {
    "view", "reshape", "_reshape_alias", "unsqueeze", "squeeze", "expand", "slice", "select", "split",
    "split_with_sizes", "chunk", "t", "transpose", "permute", "_unsafe_view", "as_strided", "detach", "alias",
    "unbind", "lift_fresh",
}


class CountOps(TorchDispatchMode):
    """Counts the ATen operations dispatched inside the `with` block, views apart."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


B, CTX, R, N_ADAPTERS, DTYPE = 8, 64, 16, 4, torch.bfloat16


def count(fn) -> collections.Counter:
    fn()  # warm: lazily built tables (rope) are not part of a step
    with CountOps() as c:
        fn()
    return c.ops


def measure(layers: int) -> dict[str, collections.Counter]:
    """The four cases on a random Qwen2 of `layers` layers."""
    from peft import LoraConfig, get_peft_model
    from transformers import DynamicCache

    from tasktune.serve.decoder_lora import LoraStacks
    from tasktune.serve.weights import load_decoder
    from tasktune.serve.kv_cache import KVCache

    config = qwen_config(True, num_hidden_layers=layers)
    hf = random_causal_lm(config, "cpu", seed=0, dtype=DTYPE).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (B,), generator=g)
    ids = torch.arange(B) % N_ADAPTERS

    # ours: the decode step, as the engine runs it
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_decoder(tmp, "cpu", DTYPE)
    cache = KVCache(layers, B, config.num_key_value_heads, CTX, ours.cfg.head_dim, DTYPE, torch.device("cpu"))
    stacks = LoraStacks({
        (layer, name): (torch.randn(N_ADAPTERS, R, d_in, generator=g).to(DTYPE),
                        torch.randn(N_ADAPTERS, d_out, R, generator=g).to(DTYPE))
        for layer in range(layers) for name, (d_in, d_out) in ours.lora_shapes().items()
    }, scaling=torch.ones(N_ADAPTERS))
    positions = torch.full((B,), CTX // 2)
    counts = {
        "ours_base": count(lambda: ours.decode(tokens, positions, ids, CTX, cache, stacks, False)),
        "ours_lora4_torch": count(lambda: ours.decode(tokens, positions, ids, CTX, cache, stacks, True)),
    }

    # Hugging Face: one new token per row on a filled cache (what generate does per step)
    prompt = torch.randint(0, config.vocab_size, (B, CTX // 2), generator=g)

    @torch.no_grad()
    def hf_step(model, **kw):
        past = DynamicCache(config=config)
        model(input_ids=prompt, past_key_values=past, use_cache=True, **kw)
        return torch.no_grad()(lambda: model(input_ids=tokens[:, None], past_key_values=past, use_cache=True, **kw))

    counts["hf_base"] = count(hf_step(hf))
    lcfg = LoraConfig(r=R, lora_alpha=2 * R, target_modules=LORA_TARGETS)
    peft = get_peft_model(hf, lcfg, adapter_name="a0")
    for k in range(1, N_ADAPTERS):
        peft.add_adapter(f"a{k}", lcfg)
    peft.eval()
    counts["peft_lora4"] = count(hf_step(peft, adapter_names=[f"a{int(i)}" for i in ids]))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(REPO / "bench" / "results" / "decode_ops.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    small, large = measure(2), measure(4)
    cases = {}
    for k in small:
        per_layer = (sum(large[k].values()) - sum(small[k].values())) / 2
        layer_ops = large[k] - small[k]  # what two more layers add, by operation
        cases[k] = {"ops_2_layers": sum(small[k].values()), "ops_4_layers": sum(large[k].values()),
                    "per_layer": per_layer, "outside_layers": sum(small[k].values()) - 2 * per_layer,
                    "per_layer_top": {n: c / 2 for n, c in layer_ops.most_common(10)}}
    out = {
        "bench": "decode_ops", "device": device_name(torch.device("cpu")), "versions": versions("transformers", "peft"),
        "config": {"batch": B, "context": CTX, "dtype": "bfloat16", "lora_r": R, "adapters": N_ADAPTERS,
                   "model": "Qwen2, tiny shape (common.TINY_SHAPE) with 2 and 4 layers, random weights"},
        "what": "ATen operations dispatched by one decode step, views excluded (each one a kernel launch on a GPU); "
                "per_layer = (ops at 4 layers - ops at 2 layers) / 2",
        "cases": cases,
        "ratios": {
            "ours_base_vs_hf_base_per_layer": cases["ours_base"]["per_layer"] / cases["hf_base"]["per_layer"],
            "ours_lora4_vs_peft_lora4_per_layer": cases["ours_lora4_torch"]["per_layer"] / cases["peft_lora4"]["per_layer"],
        },
    }
    print(", ".join(write_json(out, "decode_ops.json", files=[args.results])))
    print_table(f"ops per decode step (batch {B})", [
        (k, f"{v['per_layer']:.1f} per layer + {v['outside_layers']:.0f} outside") for k, v in cases.items()
    ] + [(k, f"{v:.2f}x") for k, v in out["ratios"].items()])


if __name__ == "__main__":
    main()
