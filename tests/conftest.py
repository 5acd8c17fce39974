"""Shared fixtures: tiny models built once per session, no network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# Without a GPU, the Triton kernels (decode-time LoRA) run under Triton's interpreter, so
# the CPU tests exercise them too (set before anything imports triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import interpreter_speed  # noqa: E402

    interpreter_speed.install()

from tiny_models import make_adapters, tiny_bert_dir, tiny_engine, tiny_llama_dir  # noqa: E402

# Tiny matmuls gain nothing from threads, and on a shared 2-core machine spinning
# OpenMP threads made them hundreds of times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return tiny_bert_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def adapter_root(tiny_llama, tmp_path_factory) -> Path:
    """Eight PEFT adapters of mixed ranks (one rsLoRA) on the tiny Llama."""
    root = tmp_path_factory.mktemp("adapters")
    make_adapters(tiny_llama, root)
    return root


@pytest.fixture(scope="module")
def engine(tiny_llama, adapter_root):
    """The engine tests' CPU engine (a module may define its own with other limits)."""
    return tiny_engine(tiny_llama, adapter_root, max_running=6, max_waiting=64, max_len=128)
