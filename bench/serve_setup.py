"""What the serving bench builds before it measures: the random base model and its PEFT
adapters on disk, and the bytes a decode step must read (its memory roofline)."""

from __future__ import annotations

from pathlib import Path

import torch

from common import LORA_TARGETS as TARGETS


def build_tokenizer(vocab: int):
    """A word-level tokenizer over the whole vocabulary (token i is 't<i>'); built in
    well under a second, no training data and no network needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", pad_token="t0", unk_token="t1")


def model_read_bytes(model, batch: int) -> int:
    """Bytes of base weights one decode step reads: every layer parameter, the final norm,
    the LM head; the embedding table only for the batch's rows."""
    total = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    total += sum(p.numel() * p.element_size() for p in model.model.norm.parameters())
    total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    emb = model.model.embed_tokens.weight
    if emb.data_ptr() != model.lm_head.weight.data_ptr():
        pass  # untied: still only the rows
    total += batch * emb.shape[1] * emb.element_size()
    return total


def adapter_bytes(cfg, r: int, elem: int) -> int:
    d, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]
    return cfg.num_layers * sum(r * (a + b) for a, b in shapes) * elem


def kv_bytes(cfg, batch: int, ctx: float, elem: int) -> float:
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * elem * batch * ctx


def make_base_and_adapters(config, folder: Path, n_adapters: int, r: int, alpha: float, device, seed=0):
    """Save the random base (+ tokenizer) and n_adapters PEFT folders; return the PeftModel
    holding all adapters (names a00, a01, ...) for the PEFT baseline."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        base = Qwen2ForCausalLM(config)
    base = base.to(torch.bfloat16).eval()
    base_dir = folder / "base"
    base.save_pretrained(base_dir, safe_serialization=True)
    build_tokenizer(config.vocab_size).save_pretrained(base_dir)
    base.config.name_or_path = str(base_dir)  # adapters record it; the pool checks it
    base.config._name_or_path = str(base_dir)
    root = folder / "adapters"
    names = [f"a{i:02d}" for i in range(n_adapters)]
    lcfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(base, lcfg, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lcfg)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".lora_A." in pname:  # A ~ N(0, 1/d_in), B ~ N(0, 0.02^2): a visible but bounded update
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) / p.shape[1] ** 0.5)
            elif ".lora_B." in pname:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02)
    for name in names:
        model.save_pretrained(root, selected_adapters=[name])  # -> root/<name>/
    lora_dtype = next(p.dtype for n, p in model.named_parameters() if "lora_A" in n)
    model.eval()  # generate(adapter_names=...) refuses training mode
    return base_dir, root, names, model, lora_dtype
