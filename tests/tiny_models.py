"""Tiny models built from a config and tokenizers trained on the fly: no network, seconds.

`tiny_llama_dir(tmp)` and `tiny_bert_dir(tmp)` write ordinary Hugging Face folders
(config + safetensors + tokenizer), so every loader under test takes the same path a
user's local model folder takes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
