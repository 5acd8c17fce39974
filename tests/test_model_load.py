"""Model loading: embedded MiniLM, local folders, family detection, clear offline errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertModel, LlamaForCausalLM, LlamaModel

from tasktune.errors import TasktuneError
from tasktune.model.family import detect_family
from tasktune.model.load import load_model, load_tokenizer, max_length_of


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


def embed(loaded, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the all-MiniLM-L6-v2 recipe)."""
    enc = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = loaded.model(**enc).last_hidden_state  # [B, T, 384]
    mask = enc["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # [B, 384]
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_minilm_is_offline_and_embeds(minilm) -> None:
    assert minilm.family == "encoder" and isinstance(minilm.model, BertModel)
    assert minilm.max_length == 512 and minilm.name == "minilm"
    assert not minilm.model.training
    e = embed(minilm, ["book a table for two tonight", "reserve a restaurant table for this evening", "the stock market fell sharply"])
    assert e.shape == (3, 384) and e.abs().sum() > 0
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # a trained model: paraphrases are closer than unrelated text
    again = embed(load_model("minilm"), ["book a table for two tonight"])
    torch.testing.assert_close(again[0], e[0], rtol=0, atol=1e-6)  # deterministic across loads


def test_tiny_llama_is_causal(tiny_llama) -> None:
    loaded = load_model(str(tiny_llama))
    assert loaded.family == "causal" and isinstance(loaded.model, LlamaForCausalLM)
    assert loaded.path == str(tiny_llama)
    assert loaded.max_length == 512  # config limit; the tokenizer's 1e30 sentinel is ignored
    assert loaded.tokenizer.eos_token_id == 2 and loaded.tokenizer.pad_token_id == 3
    assert next(loaded.model.parameters()).dtype == torch.float32
    half = load_model(str(tiny_llama), dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    trunk = load_model(str(tiny_llama), for_causal=False)
    assert trunk.family == "encoder" and isinstance(trunk.model, LlamaModel)


def test_tiny_bert_is_encoder(tiny_bert) -> None:
    loaded = load_model(str(tiny_bert))
    assert loaded.family == "encoder" and isinstance(loaded.model, BertModel)
    assert loaded.model.config.hidden_size == 64


def test_load_tokenizer_alone(tiny_llama) -> None:
    tok = load_tokenizer(str(tiny_llama))
    assert tok("book a table", add_special_tokens=False)["input_ids"]
    assert load_tokenizer("minilm").cls_token == "[CLS]"


def test_made_up_hub_id_offline_fails_naming_it(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TasktuneError, match="no-such-org/no-such-model-xyz") as info:
        load_model("no-such-org/no-such-model-xyz")
    assert "local" in str(info.value) and "offline" in str(info.value)
    with pytest.raises(TasktuneError, match="no-such-org/no-such-model-xyz"):
        load_tokenizer("no-such-org/no-such-model-xyz")


def test_folder_problems_fail_clearly(tmp_path) -> None:
    with pytest.raises(TasktuneError, match="has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(TasktuneError, match="does not exist"):
        load_model(str(tmp_path / "missing" / "model"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery", "architectures": ["MysteryNet"]}))
    with pytest.raises(TasktuneError, match="for_causal"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    "config, family",
    [
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "causal"),
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "causal"),
        ({"model_type": "mistral"}, "causal"),
        ({"architectures": ["BertModel"], "model_type": "bert"}, "encoder"),
        ({"architectures": ["BertLMHeadModel"], "model_type": "bert"}, "encoder"),
        ({"architectures": ["RobertaForMaskedLM"], "model_type": "roberta"}, "encoder"),
        ({"architectures": ["DebertaV2Model"], "model_type": "deberta-v2"}, "encoder"),
        ({"model_type": "mystery"}, None),
    ],
)
def test_detect_family(config, family) -> None:
    assert detect_family(config) == family


def test_max_length_picks_the_sane_smaller_limit() -> None:
    class Tok:
        model_max_length = int(1e30)

    assert max_length_of(Tok(), {"max_position_embeddings": 2048}) == 2048
    Tok.model_max_length = 256
    assert max_length_of(Tok(), {"max_position_embeddings": 2048}) == 256
    Tok.model_max_length = int(1e30)
    assert max_length_of(Tok(), {}) == 512
