"""MultiLoRALinear + inject_lora on tiny Llama and BERT against PEFT's LoRA and by-hand references."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.testing import assert_close
from transformers import AutoModel, AutoModelForCausalLM

from tasktune.errors import TasktuneError
from tasktune.lora.inject import inject_lora, use_adapters
from tasktune.lora.layer import AdapterRouting, MultiLoRALinear
from tasktune.lora.targets import DEFAULT_TARGETS

FAMILIES = {"llama": (AutoModelForCausalLM, "llama"), "bert": (AutoModel, "bert")}


@pytest.fixture
def folders(tiny_llama, tiny_bert):
    return {"llama": tiny_llama, "bert": tiny_bert}


def load(folders, family):
    cls, _ = FAMILIES[family]
    return cls.from_pretrained(folders[family], dtype=torch.float32).eval()


def batch(family, rows=3, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    if family == "bert" and rows > 1:
        mask[1, -3:] = 0  # a padded row
    return ids, mask


def run(model, family, embeds, mask):
    out = model(inputs_embeds=embeds, attention_mask=mask)
    return out.logits if family == "llama" else out.last_hidden_state


def forward_ids(model, family, ids, mask):
    return run(model, family, model.get_input_embeddings()(ids), mask)


def peft_layers(peft_model):
    """module path (relative to the wrapped HF model) -> PEFT LoRA layer."""
    inner = peft_model.base_model.model
    return {name: m for name, m in inner.named_modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict)}


@pytest.mark.parametrize("family,rslora", [("llama", False), ("bert", False), ("llama", True)])
def test_one_adapter_matches_peft_outputs_and_gradients(folders, family, rslora):
    targets = DEFAULT_TARGETS[family]
    torch.manual_seed(0)
    peft_model = get_peft_model(load(folders, family), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora))
    ref_layers = peft_layers(peft_model)
    with torch.no_grad():
        for layer in ref_layers.values():
            layer.lora_B["default"].weight.normal_(std=0.05)  # PEFT's B starts at 0: make it count

    ours = load(folders, family)
    handle = inject_lora(ours, ["task"], r=4, alpha=8, use_rslora=rslora)  # default targets for the family
    assert set(handle.layers) == set(ref_layers)  # the same modules PEFT adapts
    with torch.no_grad():
        for path, layer in handle.layers.items():
            layer.lora_A[0].copy_(ref_layers[path].lora_A["default"].weight)
            layer.lora_B[0].copy_(ref_layers[path].lora_B["default"].weight)
    assert handle.trainable_parameter_count("task") == sum(
        p.numel() for n, p in peft_model.named_parameters() if p.requires_grad
    )
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        f"{path}.{w}" for path in handle.layers for w in ("lora_A", "lora_B")
    }

    ids, mask = batch(family)
    weight = torch.randn(run(ours, family, ours.get_input_embeddings()(ids), mask).shape)
    emb_ref = peft_model.get_input_embeddings()(ids).detach().requires_grad_()
    emb_ours = emb_ref.detach().clone().requires_grad_()
    out_ref = run(peft_model, family, emb_ref, mask)
    with use_adapters(handle, "task"):
        out_ours = run(ours, family, emb_ours, mask)
    (out_ref * weight).sum().backward()
    (out_ours * weight).sum().backward()

    assert_close(out_ours, out_ref)
    assert (out_ours - run(load(folders, family), family, emb_ref.detach(), mask)).abs().max() > 1e-3
    assert_close(emb_ours.grad, emb_ref.grad)
    for path, layer in handle.layers.items():
        assert_close(layer.lora_A.grad[0], ref_layers[path].lora_A["default"].weight.grad)
        assert_close(layer.lora_B.grad[0], ref_layers[path].lora_B["default"].weight.grad)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_mixed_batch_rows_match_their_own_peft_adapter(folders, family):
    names, ranks = ["a0", "a1", "a2"], {"a0": 2, "a1": 4, "a2": 3}
    torch.manual_seed(1)
    ours = load(folders, family)
    handle = inject_lora(ours, names, r=4, alpha=8, ranks=ranks, init_b="random")
    peft_model = get_peft_model(load(folders, family), LoraConfig(r=2, lora_alpha=8, target_modules=DEFAULT_TARGETS[family]), adapter_name="a0")
    for n in names[1:]:
        peft_model.add_adapter(n, LoraConfig(r=ranks[n], lora_alpha=8, target_modules=DEFAULT_TARGETS[family]))
    with torch.no_grad():
        for path, ref in peft_layers(peft_model).items():
            for k, n in enumerate(names):
                A, B = handle.layers[path].adapter_weights(k)
                assert A.shape[0] == ranks[n]
                ref.lora_A[n].weight.copy_(A)
                ref.lora_B[n].weight.copy_(B)
    peft_model.eval()

    ids, mask = batch(family, rows=4)
    route = [2, 0, -1, 1]
    with torch.no_grad(), use_adapters(handle, route):
        got = forward_ids(ours, family, ids, mask)
    with torch.no_grad():
        for row, k in enumerate(route):
            if k < 0:
                with peft_model.disable_adapter():
                    want = forward_ids(peft_model, family, ids[row : row + 1], mask[row : row + 1])
            else:
                peft_model.set_adapter(names[k])
                want = forward_ids(peft_model, family, ids[row : row + 1], mask[row : row + 1])
            assert_close(got[row : row + 1], want, msg=f"row {row} (adapter {k})")
    assert (got[0] - got[1]).abs().max() > 1e-3  # the adapters really differ


class HandLoRA(nn.Module):
    """Reference for per-token routing: a plain loop over tokens, each with its own A, B."""

    def __init__(self, layer: MultiLoRALinear, token_ids: torch.Tensor):
        super().__init__()
        self.base, self.token_ids = layer.base_layer, token_ids  # token_ids: [B, T]
        self.adapters = [(*layer.adapter_weights(k), float(layer.scaling[k])) for k in range(layer.n_adapters)]

    def forward(self, x):  # x: [B, T, d_in]
        y = self.base(x).clone()
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                k = int(self.token_ids[b, t])
                if k >= 0:
                    A, B, s = self.adapters[k]
                    y[b, t] = y[b, t] + s * (B @ (A @ x[b, t]))
        return y


def test_per_token_routing_matches_hand_reference(folders):
    torch.manual_seed(2)
    ours = load(folders, "llama")
    handle = inject_lora(ours, ["x", "y"], r=4, alpha=8, ranks={"y": 3}, init_b="random")
    ids, mask = batch("llama", rows=2, length=8)
    token_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1], [1, 1, -1, -1, 0, 0, 0, 0]])
    with torch.no_grad(), use_adapters(handle, token_ids):
        got = forward_ids(ours, "llama", ids, mask)

    ref = load(folders, "llama")
    for path, layer in handle.layers.items():
        parent, _, leaf = path.rpartition(".")
        setattr(ref.get_submodule(parent), leaf, HandLoRA(layer, token_ids))
    with torch.no_grad():
        want = forward_ids(ref, "llama", ids, mask)
    assert_close(got, want)

    with torch.no_grad(), use_adapters(handle, torch.tensor([[1] * 8, [0] * 8])):
        per_token = forward_ids(ours, "llama", ids, mask)
    with torch.no_grad(), use_adapters(handle, ["y", "x"]):  # per row, by name
        per_row = forward_ids(ours, "llama", ids, mask)
    assert_close(per_token, per_row)
    assert not torch.allclose(per_token, got)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_absent_adapter_gets_zero_gradient_and_unrouted_rows_are_base(folders, family):
    torch.manual_seed(3)
    ours = load(folders, family)
    handle = inject_lora(ours, ["a", "b", "c"], r=4, alpha=8, ranks={"a": 2}, init_b="random")
    ids, mask = batch(family, rows=3)
    with use_adapters(handle, ["a", None, "a"]):
        out = forward_ids(ours, family, ids, mask)
    out.pow(2).mean().backward()
    for layer in handle.layers.values():
        for k in (1, 2):
            assert torch.equal(layer.lora_A.grad[k], torch.zeros_like(layer.lora_A.grad[k]))
            assert torch.equal(layer.lora_B.grad[k], torch.zeros_like(layer.lora_B.grad[k]))
        assert torch.equal(layer.lora_A.grad[0, 2:], torch.zeros_like(layer.lora_A.grad[0, 2:]))  # padding
    assert sum(g.abs().sum() for g in handle.grads("a")) > 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in handle.grads("b"))

    with torch.no_grad():
        base = forward_ids(load(folders, family), family, ids, mask)
        assert_close(out[1], base[1])  # routed to -1: the base model
        assert (out[0] - base[0]).abs().max() > 1e-3
        with use_adapters(handle, None):
            assert_close(forward_ids(ours, family, ids, mask), base)
        assert_close(forward_ids(ours, family, ids, mask), base)  # outside any block: base


def test_use_adapters_nests_and_validates(folders):
    model = load(folders, "bert")
    handle = inject_lora(model, ["a", "b"])
    assert handle.index("b") == 1 and handle.routing.ids is None
    with use_adapters(handle, "b"):
        assert handle.routing.ids.tolist() == 1
        with use_adapters(handle, ["a", "b", None]):
            assert handle.routing.ids.tolist() == [0, 1, -1]
        assert handle.routing.ids.tolist() == 1
    assert handle.routing.ids is None
    with pytest.raises(TasktuneError, match="unknown adapter 'zz'.*a, b"):
        handle.ids_tensor(["a", "zz"])
    with pytest.raises(TasktuneError, match="out of range"):
        handle.ids_tensor([0, 2])
    ids, mask = batch("bert", rows=2)
    with pytest.raises(ValueError, match="fit neither"), use_adapters(handle, [0, 1, 0]):
        forward_ids(model, "bert", ids, mask)


def test_targets_errors_and_defaults(folders):
    with pytest.raises(TasktuneError, match=r"'qproj'.*candidates: .*q_proj"):
        inject_lora(load(folders, "llama"), ["a"], target_modules=["q_proj", "qproj"])
    with pytest.raises(TasktuneError, match="'mlp'.*non-linear"):
        inject_lora(load(folders, "llama"), ["a"], target_modules=["mlp"])
    bert = load(folders, "bert")
    handle = inject_lora(bert, ["a"])
    assert "pooler.dense" not in handle.layers and "encoder.layer.1.output.dense" in handle.layers
    assert len(handle.layers) == 12
    with pytest.raises(TasktuneError, match="already has LoRA"):
        inject_lora(bert, ["b"])
    llama = load(folders, "llama")
    handle = inject_lora(llama, ["a"], target_modules="all-linear")
    assert "lm_head" not in handle.layers and len(handle.layers) == 14
    layer = handle.layers["model.layers.0.self_attn.q_proj"]
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))  # PEFT init: B = 0
    assert layer.lora_A.abs().sum() > 0 and not layer.base_layer.weight.requires_grad


def test_half_precision_base_keeps_fp32_adapters_and_dropout_only_in_training():
    torch.manual_seed(5)
    base = nn.Linear(16, 8)
    routing_ref = MultiLoRALinear(base, AdapterRouting(torch.tensor([0, 1, -1])), [4, 2], [2.0, 0.5])
    with torch.no_grad():
        for k in range(2):
            routing_ref.reset_adapter(k, init_b="random")
    x = torch.randn(3, 5, 16)
    want = routing_ref(x)

    half = MultiLoRALinear(nn.Linear(16, 8).to(torch.bfloat16), AdapterRouting(torch.tensor([0, 1, -1])), [4, 2], [2.0, 0.5])
    half.base_layer.load_state_dict(base.state_dict())
    assert half.lora_A.dtype == torch.float32 and half.scaling.dtype == torch.float32
    with torch.no_grad():
        half.lora_A.copy_(routing_ref.lora_A)
        half.lora_B.copy_(routing_ref.lora_B)
    got = half(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), want, rtol=2e-2, atol=3e-2)

    drop = MultiLoRALinear(nn.Linear(16, 8), AdapterRouting(torch.tensor([0, 0, 0])), [4], [1.0], dropout=0.5)
    with torch.no_grad():
        drop.reset_adapter(0, init_b="random")
    drop.train()
    assert not torch.allclose(drop(x), drop(x))
    drop.eval()
    assert torch.equal(drop(x), drop(x))


def test_routing_cache_lives_per_ids_version_and_capture(monkeypatch):
    """The per-forward routing tensors are shared while the same ids tensor is unchanged, made
    again after an in-place write, and made again when a CUDA graph capture starts (and
    when it ends) even for that same, unchanged tensor. On a GPU tests/test_graphed_step.py
    checks the graphed training step against the plain one, which this cache once broke."""
    from tasktune.lora import layer

    routing = AdapterRouting(torch.tensor([0, 1, -1]))
    made = []

    def make():
        made.append(routing.ids.clone())
        return routing.ids * 2

    first = routing.cached(("mask",), make)
    assert routing.cached(("mask",), make) is first and len(made) == 1
    routing.ids.copy_(torch.tensor([1, 1, 0]))  # a graph's static input written in place
    assert routing.cached(("mask",), make).tolist() == [2, 2, 0] and len(made) == 2
    eager = routing.cached(("mask",), make)
    monkeypatch.setattr(layer, "_capturing", lambda ids: True)  # a capture on the ids' stream starts
    captured = routing.cached(("mask",), make)
    assert captured is not eager and captured.tolist() == eager.tolist() and len(made) == 3
    assert routing.cached(("mask",), make) is captured  # every layer of the captured forward shares it
    monkeypatch.setattr(layer, "_capturing", lambda ids: False)
    assert routing.cached(("mask",), make) is not captured and len(made) == 4
