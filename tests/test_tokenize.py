"""Tokenisation: exact prompt/target boundary, loss mask, BOS/EOS, word-label alignment."""

from __future__ import annotations

import pytest
from tiny_models import train_tokenizer
from tokenizers import processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tasktune.data.tokenize import IGNORE, adds_bos, encode_causal, encode_encoder, encode_prompt
from tasktune.errors import TasktuneError
from tasktune.model.load import minilm_path
from tasktune.tasks.spec import Rendered


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("bpe")


@pytest.fixture(scope="module")
def bpe_with_bos():
    """A Llama-style tokenizer whose post-processor puts <s> in front."""
    backend = train_tokenizer("bpe").backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def minilm():
    return AutoTokenizer.from_pretrained(minilm_path())


R = Rendered(prompt="classify the intent of the following utterance: play the beatles\nintent:", target=" play_music", template_index=0)


def test_causal_is_prompt_then_target_then_eos(bpe) -> None:
    enc = encode_causal(bpe, R, max_length=256)
    prompt = bpe(R.prompt, add_special_tokens=False)["input_ids"]
    target = bpe(R.target, add_special_tokens=False)["input_ids"]
    assert not adds_bos(bpe)  # has <s> but does not add it: no BOS
    assert enc.input_ids == prompt + target + [bpe.eos_token_id]
    assert enc.labels == [IGNORE] * len(prompt) + target + [bpe.eos_token_id]
    assert enc.prompt_len == len(prompt) and not enc.truncated
    # the supervised tokens decode back to exactly the target
    supervised = [t for t in enc.labels if t != IGNORE]
    assert bpe.decode(supervised, skip_special_tokens=True) == R.target


def test_causal_bos_when_the_tokenizer_adds_it(bpe, bpe_with_bos) -> None:
    assert adds_bos(bpe_with_bos)
    enc = encode_causal(bpe_with_bos, R, max_length=256)
    plain = encode_causal(bpe, R, max_length=256)
    assert enc.input_ids == [bpe_with_bos.bos_token_id] + plain.input_ids
    assert enc.labels == [IGNORE] + plain.labels
    # the target is tokenised without special tokens: no stray BOS before it
    assert enc.input_ids.count(bpe_with_bos.bos_token_id) == 1
    forced = encode_causal(bpe, R, max_length=256, add_bos=True)
    assert forced.input_ids == enc.input_ids
    assert encode_prompt(bpe_with_bos, R.prompt) == enc.input_ids[: enc.prompt_len]


def test_causal_truncation_keeps_target_and_prompt_ends(bpe_with_bos) -> None:
    long = Rendered(prompt="summarize: " + "person1 talks about the meeting " * 40 + "\nsummary:", target=" they meet", template_index=0)
    full = encode_causal(bpe_with_bos, long, max_length=10_000)
    enc = encode_causal(bpe_with_bos, long, max_length=64)
    assert enc.truncated and len(enc) == 64
    n_target = len(full) - full.prompt_len
    assert enc.input_ids[-n_target:] == full.input_ids[-n_target:]  # whole target + EOS kept
    assert enc.labels[-n_target:] == full.labels[-n_target:]
    assert all(t == IGNORE for t in enc.labels[: enc.prompt_len])
    p, fp = enc.input_ids[: enc.prompt_len], full.input_ids[: full.prompt_len]
    # BOS, then the rest of the budget split between the start and the end of the prompt
    tail = (len(p) - 1) // 2
    head = len(p) - tail
    assert abs((head - 1) - tail) <= 1 and len(p) == 64 - n_target
    assert p[0] == bpe_with_bos.bos_token_id
    assert p == fp[:head] + fp[len(fp) - tail :]
    # a target longer than the budget is cut to half the length and loses its EOS
    huge = Rendered(prompt="summarize:", target=" the meeting" * 100, template_index=0)
    cut = encode_causal(bpe_with_bos, huge, max_length=32)
    assert len(cut) == 32 and cut.labels[-1] != bpe_with_bos.eos_token_id


def test_causal_without_eos_is_an_error(minilm) -> None:
    with pytest.raises(TasktuneError, match="EOS"):
        encode_causal(minilm, R, max_length=64)


def test_encoder_text_has_special_tokens(minilm) -> None:
    enc = encode_encoder(minilm, "Play the Beatles", max_length=32)
    assert enc.input_ids == minilm("Play the Beatles")["input_ids"]
    assert enc.input_ids[0] == minilm.cls_token_id and enc.input_ids[-1] == minilm.sep_token_id
    assert enc.attention_mask == [1] * len(enc.input_ids) and enc.labels is None
    assert len(encode_encoder(minilm, "word " * 100, max_length=16).input_ids) == 16


def test_encoder_tags_on_first_subtoken(minilm) -> None:
    words = ["Play", "unbelievably", "Zyzzyva", "now"]
    tags = [0, 1, 2, 3]
    enc = encode_encoder(minilm, words, max_length=32, tags=tags)
    pieces = minilm.convert_ids_to_tokens(enc.input_ids)
    # reference: [CLS] play un ##bel ##ie ##va ##bly z ##y ##zzy ##va now [SEP]
    expected = []
    for piece in pieces:
        if piece in ("[CLS]", "[SEP]") or piece.startswith("##"):
            expected.append(IGNORE)
        else:
            expected.append(tags[len([e for e in expected if e != IGNORE])])
    assert enc.labels == expected
    assert [t for t in enc.labels if t != IGNORE] == tags
    assert len(enc.labels) > len(words) + 2  # there really were continuation sub-tokens


def test_encoder_tags_on_tiny_wordpiece() -> None:
    tok = train_tokenizer("wordpiece")
    words = ["play", "beatles", "xyzzyq", "paris"]
    enc = encode_encoder(tok, words, max_length=32, tags=[5, 6, 7, 8])
    assert enc.word_ids == [None, 0, 1, 2, 3, None]
    assert enc.labels == [IGNORE, 5, 6, 7, 8, IGNORE]


def test_encoder_truncation_and_mismatch(minilm) -> None:
    words = ["word"] * 20
    enc = encode_encoder(minilm, words, max_length=8, tags=list(range(20)))
    assert len(enc.input_ids) == 8 and enc.truncated
    assert [t for t in enc.labels if t != IGNORE] == list(range(6))
    with pytest.raises(TasktuneError, match="3 tags for 2 words"):
        encode_encoder(minilm, ["a", "b"], max_length=8, tags=[0, 1, 2])
