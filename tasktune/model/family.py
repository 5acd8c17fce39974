"""Causal LM or encoder? Decided from a model folder's config.json, before loading weights.

The family picks everything downstream: causal LMs are trained text-to-text with loss on
the target (and can be packed); encoders get a task head on pooled or per-token states.
`architectures` is the most direct signal (what the checkpoint was saved as);
`model_type` is the fallback for configs saved without it.
"""

from __future__ import annotations

from typing import Any, Literal

Family = Literal["causal", "encoder"]

ENCODER_TYPES = frozenset(
    {
        "bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
        "mpnet", "camembert", "ernie", "modernbert", "nomic_bert", "xlm", "funnel", "mobilebert", "layoutlm",
    }
)
CAUSAL_TYPES = frozenset(
    {
        "llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mistral", "mixtral", "gpt2", "gpt_neo", "gpt_neox",
        "gptj", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "opt", "falcon", "bloom", "olmo", "olmo2",
        "stablelm", "starcoder2", "smollm3", "granite", "cohere", "codegen", "mpt",
    }
)
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def detect_family(config: dict[str, Any]) -> Family | None:
    """The family of a config.json dict, or None when it cannot be told (the caller
    then asks the user for `for_causal`)."""
    for arch in config.get("architectures") or []:
        if arch.endswith(_CAUSAL_SUFFIXES) and not arch.startswith(("Bert", "Roberta", "XLMRoberta", "Electra")):
            return "causal"
    model_type = str(config.get("model_type", "")).lower()
    if model_type in ENCODER_TYPES:
        return "encoder"
    if model_type in CAUSAL_TYPES:
        return "causal"
    for arch in config.get("architectures") or []:
        if arch.endswith(("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")):
            return "encoder"
    return None
