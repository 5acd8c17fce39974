"""The served decoder's configuration, read from a Hugging Face config.json (Llama, Qwen2,
Mistral), with a clear error for what the engine cannot serve."""

from __future__ import annotations

from dataclasses import dataclass

from tasktune.errors import TasktuneError

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")


class UnsupportedModel(TasktuneError):
    """The model folder is not a decoder this engine can serve."""


@dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None = None  # the engine caps its context here (no window masking yet)

    @property
    def o_proj_bias(self) -> bool:
        return self.attention_bias and self.model_type == "llama"  # Qwen2 biases q, k, v only

    @classmethod
    def from_dict(cls, c: dict) -> "DecoderConfig":
        kind = c.get("model_type")
        if kind not in SUPPORTED_TYPES:
            raise UnsupportedModel(f"model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise UnsupportedModel(f"rope scaling {rope_type!r} is not supported yet (only the default RoPE)")
        if c.get("hidden_act", "silu") != "silu" or c.get("mlp_bias", False):
            raise UnsupportedModel("only a SiLU MLP without bias is supported")
        heads = int(c["num_attention_heads"])
        uses_window = kind == "mistral" or bool(c.get("use_sliding_window"))
        window = int(c["sliding_window"]) if uses_window and c.get("sliding_window") else None
        eos = c.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            model_type=kind,
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
            rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=bool(c.get("attention_bias", kind == "qwen2")),
            max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
            eos_token_ids=eos_ids,
            sliding_window=window,
        )
