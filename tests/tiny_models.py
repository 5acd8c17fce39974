"""Tiny models built from a config and tokenizers trained on the fly: no network, seconds.

`tiny_llama_dir(tmp)` and `tiny_bert_dir(tmp)` write ordinary Hugging Face folders
(config + safetensors + tokenizer), so every loader under test takes the same path a
user's local model folder takes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "book a table for two at an italian restaurant tonight",
    "play the latest album by the beatles on spotify",
    "what is the weather in paris tomorrow",
    "add this song to my workout playlist",
    "rate this book five stars",
    "intent: book_restaurant play_music get_weather add_to_playlist rate_book",
    "yes no maybe sometimes in the middle other",
    "summarize the dialogue between person1 and person2 about the meeting",
    "classify the intent of the following utterance",
    "slot: value; artist: the beatles; city: paris; none",
] * 4


def train_tokenizer(kind: str = "bpe", vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A small BPE (causal) or WordPiece (encoder) tokenizer trained on CORPUS."""
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        from tokenizers import decoders

        tok.decoder = decoders.ByteLevel()
        special = ["<unk>", "<s>", "</s>", "<pad>"]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(CORPUS, trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    from tokenizers import decoders, processors

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )


def tiny_llama_dir(root: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64, GQA 4/2 heads) with a trained BPE tokenizer, saved as a folder."""
    out = Path(root) / "tiny-llama"
    if (out / "config.json").exists():
        return out
    tokenizer = train_tokenizer("bpe")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def tiny_bert_dir(root: Path, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (hidden 64) with a trained WordPiece tokenizer, saved as a folder."""
    out = Path(root) / "tiny-bert"
    if (out / "config.json").exists():
        return out
    tokenizer = train_tokenizer("wordpiece")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = BertModel(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# --- PEFT adapters for the serving tests -----------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "book a table",
    "play the latest album by the beatles on spotify",
    "what is the weather in paris",
    "add this song to my workout playlist and rate this book five stars",
    "yes",
    "summarize the dialogue between person1 and person2 about the meeting tomorrow",
    "intent:",
    "classify the intent of the following utterance: play music",
]


def make_adapter(base_dir: Path, out: Path, r: int = 4, alpha: float = 8, seed: int = 0, **kw) -> Path:
    """A PEFT LoRA folder with random non-zero A and B so that adapters really differ."""
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    model.save_pretrained(out)
    return out


def make_adapters(base_dir: Path, root: Path, n: int = 8) -> list[str]:
    names = []
    for i in range(n):
        name = f"task-{i}"
        make_adapter(base_dir, root / name, r=[2, 4, 8, 4, 2, 8, 6, 3][i % 8], alpha=[4, 8, 16, 4, 8, 8, 12, 3][i % 8],
                     seed=100 + i, use_rslora=(i == 5))
        names.append(name)
    return names


def tiny_engine(model_dir: Path, adapter_root: Path, **options):
    """A CPU engine on the tiny Llama with every adapter under adapter_root registered
    (4 resident, max rank 8); options go to Engine.from_pretrained (max_running, max_len ...)."""
    from tasktune.serve.engine import Engine

    eng = Engine.from_pretrained(model_dir, adapter_root=adapter_root, max_resident=4, max_rank=8, **options)
    eng.pool.register_root()
    return eng
