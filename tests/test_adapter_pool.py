"""The adapter pool: strict validation, LRU residency, lazy loading, 1,000 registrations."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import PROMPTS, make_adapter

from tasktune.serve.adapter_pool import (
    AdapterBusy,
    AdapterExists,
    AdapterNotFound,
    AdapterPathError,
    AdapterPool,
    InvalidAdapter,
    InvalidAdapterName,
)
from tasktune.serve.engine import Engine, Request
from tasktune.serve.sampling import SamplingParams

SHAPES = {m: (64, 64) for m in ("q_proj", "o_proj")} | {"k_proj": (64, 32), "v_proj": (64, 32)} | {
    "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}


def pool_for(root: Path, **kw) -> AdapterPool:
    return AdapterPool(num_layers=2, shapes=SHAPES, base_name="tiny-llama", root=root, **kw)


@pytest.fixture
def root(tmp_path, adapter_root) -> Path:  # noqa: F811
    r = tmp_path / "root"
    r.mkdir()
    shutil.copytree(adapter_root / "task-1", r / "good")
    return r


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def variant(root: Path, name: str) -> Path:
    shutil.copytree(root / "good", root / name)
    return root / name


def test_valid_adapter_registers_with_metadata_only(root):
    pool = pool_for(root)
    info = pool.register("good", "good")
    assert info.rank == 4 and info.scaling == 2.0 and len(info.modules) == 7
    assert pool.loads == 0 and "good" in pool and pool.names() == ["good"]


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".", "..", "sp ace", "x" * 129, "naïve"])
def test_bad_names(root, name):
    with pytest.raises(InvalidAdapterName, match="invalid adapter name"):
        pool_for(root).register(name, "good")


def test_paths_outside_the_root_are_refused(root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(root / "good", outside)
    pool = pool_for(root)
    with pytest.raises(AdapterPathError, match="outside the adapter root"):
        pool.register("a", outside)
    with pytest.raises(AdapterPathError, match="outside the adapter root"):
        pool.register("b", "../outside")
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AdapterPathError, match="outside the adapter root"):
        pool.register("c", "link")
    linked = root / "linked-file"
    linked.mkdir()
    shutil.copy(outside / "adapter_config.json", linked)
    (linked / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    with pytest.raises(AdapterPathError, match="links outside"):
        pool.register("d", "linked-file")
    with pytest.raises(AdapterPathError, match="does not exist"):
        pool.register("e", "missing")
    with pytest.raises(AdapterPathError, match="does not exist"):
        pool.register("f", "bad\x00path")


def test_pickle_weights_are_refused(root):
    folder = variant(root, "pickled")
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidAdapter, match=r"pickle weights \(.bin/.pt\) are refused"):
        pool_for(root).register("pickled", "pickled")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"r": 32}, "above the pool's max_rank 16"),
        ({"base_model_name_or_path": "Qwen/Qwen2.5-7B"}, "trained for base 'Qwen/Qwen2.5-7B'"),
        ({"target_modules": ["q_proj", "lm_head"]}, r"target modules \['lm_head'\] do not exist"),
        ({"target_modules": ["q_proj"]}, "targets a layer/module outside the config"),
        ({"peft_type": "IA3"}, "not a LoRA adapter"),
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"r": "4"}, "must be a positive integer"),
    ],
)
def test_config_mismatches(root, changes, message):
    edit_config(variant(root, "bad"), **changes)
    with pytest.raises(InvalidAdapter, match=message):
        pool_for(root).register("bad", "bad")


def test_tensor_problems(root):
    folder = variant(root, "shapes")
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    save_file({**tensors, key: torch.zeros(4, 63)}, folder / "adapter_model.safetensors")
    with pytest.raises(InvalidAdapter, match=r"has shape \[4, 63\], expected \[4, 64\]"):
        pool_for(root).register("shapes", "shapes")
    save_file({k: v for k, v in tensors.items() if k != key}, folder / "adapter_model.safetensors")
    with pytest.raises(InvalidAdapter, match="1 tensor\\(s\\) missing"):
        pool_for(root).register("shapes", "shapes")
    (folder / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidAdapter, match="not a valid safetensors file"):
        pool_for(root).register("shapes", "shapes")
    (folder / "adapter_config.json").write_text("{oops")
    with pytest.raises(InvalidAdapter, match="not valid JSON"):
        pool_for(root).register("shapes", "shapes")


def test_non_finite_weights_are_refused_when_loaded(root, tiny_llama):  # noqa: F811
    """Rows of many tenants share each matmul: an adapter with NaN / inf never enters the
    pool (the request gets the error; other adapters keep serving)."""
    folder = variant(root, "nan")
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if "v_proj.lora_B" in k)
    tensors[key][0, 0] = float("inf")
    save_file(tensors, folder / "adapter_model.safetensors")
    eng = Engine.from_pretrained(tiny_llama, adapter_root=root, max_resident=2, max_rank=8, max_len=64)
    eng.pool.register("nan", "nan")  # registration reads headers only
    eng.pool.register("good", "good")
    bad = eng.submit(Request(PROMPTS[0], "nan", SamplingParams(max_tokens=3)))
    good = eng.submit(Request(PROMPTS[0], "good", SamplingParams(max_tokens=3)))
    while eng.has_work:
        eng.step()
    assert bad.finish_reason == "error" and "has NaN or infinite values" in bad.error and key in bad.error
    assert good.finish_reason in ("length", "stop") and len(good.output_ids) == 3
    assert "nan" not in eng.pool.resident()


def test_registry_errors(root):
    pool = pool_for(root)
    pool.register("good", "good")
    with pytest.raises(AdapterExists):
        pool.register("good", "good")
    with pytest.raises(AdapterExists):
        pool.register("tiny-llama", "good")
    with pytest.raises(AdapterNotFound):
        pool.acquire("nope")
    with pytest.raises(AdapterNotFound):
        pool.unregister("nope")
    assert pool.acquire("good") == 0
    with pytest.raises(AdapterBusy):
        pool.unregister("good")
    pool.release("good")
    pool.unregister("good")
    assert "good" not in pool and pool.resident() == []


def test_lru_eviction_and_pinning(root):
    for n in ("a", "b", "c"):
        variant(root, n)
    pool = pool_for(root, max_resident=2, max_cpu=1)
    for n in ("a", "b", "c"):
        pool.register(n, n)
    sa, sb = pool.acquire("a"), pool.acquire("b")
    assert pool.acquire("c") is None  # both slots pinned by running sequences
    pool.release("a")
    pool.release("b")
    pool.acquire("b")
    pool.release("b")  # "a" is now least recently used
    assert pool.acquire("c") == sa and pool.resident() == ["b", "c"]
    assert pool.loads == 3
    pool.release("c")
    assert pool.acquire("a") == sb  # evicts b; a was dropped from the 1-entry CPU cache
    assert pool.loads == 4
    A, B = pool.stacks.weights[(0, "q_proj")]
    assert A[sb, :4].abs().sum() > 0 and A[sb, 4:].abs().sum() == 0  # rank 4 padded to 16


def test_eviction_and_reload_give_the_same_outputs(tiny_llama, adapter_root):  # noqa: F811
    eng = Engine.from_pretrained(tiny_llama, adapter_root=adapter_root, max_resident=1, max_rank=8,
                                 max_running=4, max_len=96)
    eng.pool.max_cpu = 0  # every reload comes from disk
    eng.pool.register_root()
    names = ["task-0", "task-3", "task-7"]
    reqs = [Request(PROMPTS[1], n, SamplingParams(max_tokens=8)) for n in names]
    first = [c.token_ids for c in eng.generate(reqs)]
    again = [c.token_ids for c in eng.generate(reqs[::-1])][::-1]
    assert first == again and len(set(map(tuple, first))) == 3
    assert eng.pool.loads >= 5


def test_thousand_registered_adapters_read_only_metadata(tmp_path, tiny_llama):
    root = tmp_path / "many"
    make_adapter(tiny_llama, root / "proto", r=1, alpha=2, seed=3)
    for i in range(1000):
        shutil.copytree(root / "proto", root / f"a{i:04d}")
    pool = pool_for(root, max_resident=4)
    t0 = time.monotonic()
    for i in range(1000):
        pool.register(f"a{i:04d}", f"a{i:04d}")
    elapsed = time.monotonic() - t0
    assert len(pool) == 1000 and pool.loads == 0 and elapsed < 20
    for i in (5, 999, 5, 500, 42, 7):
        pool.acquire(f"a{i:04d}")
        pool.release(f"a{i:04d}")
    assert pool.loads == 5 and len(pool.resident()) == 4
