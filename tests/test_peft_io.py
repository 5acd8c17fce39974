"""PEFT folder round trips in both directions, refusals, and merged export."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import AutoModel, AutoModelForCausalLM

from tasktune.errors import TasktuneError
from tasktune.lora.inject import inject_lora, use_adapters
from tasktune.lora.layer import MultiLoRALinear
from tasktune.lora.merge import merge_into_base, merged_state_dict
from tasktune.lora.peft_io import load_adapter_into, load_adapters, read_adapter, save_adapter

CASES = {  # family -> (loader, PEFT task_type, output of interest)
    "llama": (AutoModelForCausalLM, "CAUSAL_LM", "logits"),
    "bert": (AutoModel, "FEATURE_EXTRACTION", "last_hidden_state"),
}


@pytest.fixture
def folders(tiny_llama, tiny_bert):
    return {"llama": tiny_llama, "bert": tiny_bert}


def load(folders, family):
    # float64: ours and PEFT add the same numbers in different orders; in float32 that can
    # differ by more than assert_close allows, depending on how the BLAS blocks each shape
    return CASES[family][0].from_pretrained(folders[family], dtype=torch.float64).eval()


def outputs(model, family, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (2, 7), generator=g)
    with torch.no_grad():
        return getattr(model(input_ids=ids, attention_mask=torch.ones_like(ids)), CASES[family][2])


def peft_with_random_b(folders, family, config, seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(load(folders, family), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model.eval()


def test_state_dict_keys_are_the_ones_peft_writes(folders, tmp_path):
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = peft_with_random_b(folders, "llama", LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "peft")
    written = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    handle = inject_lora(load(folders, "llama"), ["a"], r=4, alpha=8, target_modules=targets)
    ours = handle.state_dict_for("a")
    assert set(ours) == set(written)
    assert all(ours[k].shape == written[k].shape for k in ours)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_saved_adapter_loads_in_peft_with_identical_outputs(folders, family, tmp_path):
    torch.manual_seed(4)
    ours = load(folders, family)
    handle = inject_lora(ours, ["first", "second"], r=4, alpha=16, ranks={"second": 2}, init_b="random")
    out = save_adapter(handle, "second", tmp_path / "second", str(folders[family]), task_type=CASES[family][1])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    assert config["task_type"] == CASES[family][1] and config["bias"] == "none"

    reference = PeftModel.from_pretrained(load(folders, family), out).eval()
    with use_adapters(handle, "second"):
        got = outputs(ours, family)
    assert_close(got, outputs(reference, family))
    assert (got - outputs(load(folders, family), family)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_peft_saved_adapter_loads_into_our_slot(folders, family, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"] if family == "bert" else ["q_proj", "up_proj"])
    reference = peft_with_random_b(folders, family, config)
    reference.save_pretrained(tmp_path / "peft")

    ours = load(folders, family)
    handle = inject_lora(ours, ["other", "loaded"], r=8, target_modules=None)  # more targets, higher r_max
    load_adapter_into(handle, "loaded", tmp_path / "peft")
    with use_adapters(handle, "loaded"):
        assert_close(outputs(ours, family), outputs(reference, family))
    assert handle.trainable_parameter_count("loaded") == sum(
        p.numel() for n, p in reference.named_parameters() if "lora_" in n
    )


def test_rank_and_alpha_patterns_round_trip(folders, tmp_path):
    """A PEFT adapter with per-module ranks, alphas and rsLoRA -> serving handle -> saved
    again by us -> PEFT: the same logits all the way."""
    config = LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj", "down_proj"],
        rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3.0},
    )  # fmt: skip
    reference = peft_with_random_b(folders, "llama", config, seed=5)
    reference.save_pretrained(tmp_path / "peft")
    other = peft_with_random_b(folders, "llama", LoraConfig(r=6, lora_alpha=6, target_modules=["v_proj"]), seed=6)
    other.save_pretrained(tmp_path / "other")

    ours = load(folders, "llama")
    handle = load_adapters(ours, {"patterned": tmp_path / "peft", "other": tmp_path / "other"})
    assert next(iter(handle.layers.values())).r_max == 6
    with use_adapters(handle, ["patterned", "other"]):
        got = outputs(ours, "llama")
    assert_close(got[0], outputs(reference, "llama")[0])
    assert_close(got[1], outputs(other, "llama")[1])

    save_adapter(handle, "patterned", tmp_path / "again", "tiny")
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert saved["use_rslora"] and saved["r"] == 4 and list(saved["rank_pattern"].values()) == [2, 2]
    again = PeftModel.from_pretrained(load(folders, "llama"), tmp_path / "again").eval()
    assert_close(outputs(again, "llama"), outputs(reference, "llama"))


def test_read_adapter_refuses_what_it_cannot_trust(folders, tmp_path):
    handle = inject_lora(load(folders, "bert"), ["a"], r=4, init_b="random")
    good = save_adapter(handle, "a", tmp_path / "good", "tiny")
    weights = read_adapter(good)
    assert len(weights.modules) == 12 and weights.max_rank == 4

    def variant(name, edit_config=None, edit_tensors=None, pickle=False):
        folder = tmp_path / name
        folder.mkdir()
        config = json.loads((good / "adapter_config.json").read_text())
        (edit_config or (lambda c: None))(config)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        tensors = load_file(str(good / "adapter_model.safetensors"))
        (edit_tensors or (lambda t: None))(tensors)
        if pickle:
            torch.save(tensors, folder / "adapter_model.bin")
        else:
            save_file(tensors, str(folder / "adapter_model.safetensors"))
        return folder

    with pytest.raises(TasktuneError, match="pickled adapter weights are refused"):
        read_adapter(variant("pickle", pickle=True))
    with pytest.raises(TasktuneError, match="only LORA"):
        read_adapter(variant("ia3", lambda c: c.update(peft_type="IA3")))
    with pytest.raises(TasktuneError, match="use_dora"):
        read_adapter(variant("dora", lambda c: c.update(use_dora=True)))
    with pytest.raises(TasktuneError, match="rank 3 from the config"):
        read_adapter(variant("rank", lambda c: c.update(r=3)))
    key = next(iter(load_file(str(good / "adapter_model.safetensors"))))
    with pytest.raises(TasktuneError, match="unsupported tensor"):
        read_adapter(variant("extra", edit_tensors=lambda t: t.update({"base_model.model.pooler.dense.weight": t[key].clone()})))
    with pytest.raises(TasktuneError, match="lora_B only"):
        read_adapter(variant("half", edit_tensors=lambda t: t.pop(key.replace("lora_B", "lora_A"))))
    with pytest.raises(TasktuneError, match="no adapter_config.json"):
        read_adapter(tmp_path)

    llama_handle = inject_lora(load(folders, "llama"), ["x"], r=4)
    with pytest.raises(TasktuneError, match="no LoRA layer for"):
        load_adapter_into(llama_handle, "x", good)
    small = inject_lora(load(folders, "bert"), ["x"], r=2)
    with pytest.raises(TasktuneError, match="exceeds the slot's r_max 2"):
        load_adapter_into(small, "x", good)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_merged_base_matches_adapter_model(folders, family):
    torch.manual_seed(7)
    ours = load(folders, family)
    handle = inject_lora(ours, ["a", "b"], r=4, alpha=8, ranks={"b": 3}, init_b="random")
    with use_adapters(handle, "b"):
        want = outputs(ours, family)

    fresh = load(folders, family)
    state = merged_state_dict(ours, handle, "b")
    assert set(state) == set(fresh.state_dict())
    fresh.load_state_dict(state)
    assert_close(outputs(fresh, family), want, rtol=1e-4, atol=1e-5)
    assert (outputs(fresh, family) - outputs(load(folders, family), family)).abs().max() > 1e-3

    merged = merge_into_base(ours, handle, "b")
    assert not any(isinstance(m, MultiLoRALinear) for m in merged.modules())
    assert_close(outputs(merged, family), want, rtol=1e-4, atol=1e-5)
