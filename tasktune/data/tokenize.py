"""Text -> token ids, for causal LMs (loss on the target only) and for encoders.

Causal: the prompt and the target are tokenised separately and concatenated, so the
boundary between "what the model reads" and "what it is trained to write" is exact
(tokenising `prompt + target` in one go can merge tokens across the boundary, and then
no label mask is right). The same `encode_prompt` is what generation feeds the model,
so a trained prompt is exactly a served prompt.

Encoder: plain text, or a word list for tagging, with each word's tag placed on its
first sub-token (the others get -100, as in the usual BERT NER recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

from tasktune.errors import TasktuneError
from tasktune.tasks.spec import Rendered

IGNORE = -100


@dataclass
class EncodedExample:
    """One causal-LM example. labels[t] == input_ids[t] on target tokens, IGNORE on the
    prompt; the model's usual shift (logits[t] predicts labels[t+1]) applies downstream."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int  # tokens of the prompt (BOS included) kept after truncation
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodedEncoder:
    """One encoder input. labels: per sub-token tag index (tagging) or None."""

    input_ids: list[int]
    attention_mask: list[int]
    labels: list[int] | None = None
    word_ids: list[int | None] | None = None  # sub-token -> word index (tagging inputs)
    truncated: bool = False


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself puts BOS in front (Llama-style); GPT-2 and Qwen do not."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_prompt(tokenizer, prompt: str, add_bos: bool | None = None) -> list[int]:
    """Prompt ids: BOS (when the tokenizer has one and adds it, or add_bos=True) + text.

    Special tokens other than BOS are never added: a tokenizer whose post-processor
    also appends EOS would otherwise end the prompt with EOS.
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    want_bos = adds_bos(tokenizer) if add_bos is None else add_bos
    if want_bos:
        if tokenizer.bos_token_id is None:
            raise TasktuneError(f"tokenizer {type(tokenizer).__name__} has no BOS token, but add_bos=True")
        ids = [tokenizer.bos_token_id] + ids
    return ids


def _middle_cut(ids: list[int], budget: int, keep_first: int) -> list[int]:
    """Drop tokens from the middle: the start (instruction) and end (answer cue) of a
    prompt carry the task, the middle is usually the long input text."""
    if len(ids) <= budget:
        return ids
    if budget <= 0:
        return []
    tail = (budget - keep_first) // 2
    head = budget - tail
    return ids[:head] + (ids[len(ids) - tail:] if tail else [])


def encode_causal(tokenizer, rendered: Rendered, max_length: int, add_bos: bool | None = None) -> EncodedExample:
    """Prompt + target + EOS, at most `max_length` tokens, loss on target and EOS only.

    Too long: the target keeps up to max(max_length - prompt, max_length // 2) tokens
    (a target cut short loses its EOS, so the model is not taught to stop early); the
    prompt fills the rest, cut in the middle (see `_middle_cut`), keeping BOS.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TasktuneError(f"tokenizer {type(tokenizer).__name__} has no EOS token; a causal target must end with one")
    if max_length < 2:
        raise TasktuneError(f"max_length {max_length} is too short for a prompt and a target")
    prompt = encode_prompt(tokenizer, rendered.prompt, add_bos)
    target = tokenizer(rendered.target, add_special_tokens=False)["input_ids"] + [eos]
    truncated = len(prompt) + len(target) > max_length
    if truncated:
        target_budget = max(max_length - len(prompt), max_length // 2)
        target = target[:target_budget]
        keep_first = 1 if prompt and prompt[0] == tokenizer.bos_token_id else 0
        prompt = _middle_cut(prompt, max_length - len(target), keep_first)
    return EncodedExample(
        input_ids=prompt + target,
        labels=[IGNORE] * len(prompt) + list(target),
        prompt_len=len(prompt),
        truncated=truncated,
    )


def encode_encoder(
    tokenizer, text_or_tokens: str | list[str], max_length: int, tags: list[int] | None = None
) -> EncodedEncoder:
    """Encoder input with the tokenizer's own special tokens ([CLS] ... [SEP]).

    text_or_tokens: a string, or a word list (tagging). tags: one label index per word;
    it goes on the word's first sub-token, IGNORE on special tokens and later sub-tokens.
    Words cut off by `max_length` lose their labels (`truncated` says so).
    """
    words = isinstance(text_or_tokens, (list, tuple))
    if tags is not None:
        if not words:
            raise TasktuneError("encode_encoder: tags need a word list, not a string")
        if len(tags) != len(text_or_tokens):
            raise TasktuneError(f"encode_encoder: {len(tags)} tags for {len(text_or_tokens)} words")
    if words and not getattr(tokenizer, "is_fast", False):
        raise TasktuneError(f"tagging needs a fast tokenizer (word_ids); {type(tokenizer).__name__} is not one")
    enc = tokenizer(
        list(text_or_tokens) if words else text_or_tokens,
        is_split_into_words=words,
        truncation=True,
        max_length=max_length,
        return_overflowing_tokens=False,
    )
    input_ids = list(enc["input_ids"])
    word_ids = enc.word_ids() if words else None
    labels = None
    truncated = False
    if words:
        seen_words = {w for w in word_ids if w is not None}
        truncated = len(seen_words) < len(text_or_tokens)
    if tags is not None:
        labels, previous = [], None
        for w in word_ids:
            labels.append(tags[w] if w is not None and w != previous else IGNORE)
            previous = w
    return EncodedEncoder(
        input_ids=input_ids,
        attention_mask=list(enc.get("attention_mask", [1] * len(input_ids))),
        labels=labels,
        word_ids=word_ids,
        truncated=truncated,
    )
