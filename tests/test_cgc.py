"""CGC-LoRA: the layer against a float64 loop, routing, gates, gradients, budget, and the
folded adapters against PEFT loading them on a fresh base model."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn
from torch.testing import assert_close
from transformers import AutoModel, AutoModelForCausalLM

from tasktune.errors import TasktuneError
from tasktune.lora.cgc import CGCHandle, CGCLoRALinear, CGCSpec, cgc_ranks, inject_cgc, use_tasks
from tasktune.lora.fold import fold_task, save_folded_adapter
from tasktune.lora.inject import inject_lora, use_adapters
from tasktune.lora.layer import AdapterRouting
from tasktune.lora.peft_io import load_adapters

TASKS = ["intent", "slots", "summary"]
CASES = {  # family -> (loader, PEFT task_type, output of interest)
    "llama": (AutoModelForCausalLM, "CAUSAL_LM", "logits"),
    "bert": (AutoModel, "FEATURE_EXTRACTION", "last_hidden_state"),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: intra-op threads only add sync cost (10-100x on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def folders(tiny_llama, tiny_bert):
    return {"llama": tiny_llama, "bert": tiny_bert}


def load(folders, family):
    return CASES[family][0].from_pretrained(folders[family], dtype=torch.float32).eval()


def input_ids(seed=0, rows=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 200, (rows, 7), generator=g)


def run(model, family, ids):
    with torch.no_grad():
        return getattr(model(input_ids=ids, attention_mask=torch.ones_like(ids)), CASES[family][2])


@torch.no_grad()
def randomize(layers, seed=0, b_std=0.05):
    """Non-zero B, gate logits (and input gates) so that every expert and gate matters."""
    g = torch.Generator().manual_seed(seed)
    for layer in layers:
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * b_std)
        layer.gate_logits.copy_(torch.randn(layer.gate_logits.shape, generator=g))
        if layer.gate_proj is not None:
            layer.gate_proj.copy_(torch.randn(layer.gate_proj.shape, generator=g) * 0.1)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def make_layer(d_in=16, d_out=12, k_common=2, k_specific=2, r_e=3, input_gate=False, seed=0):
    torch.manual_seed(seed)
    layer = CGCLoRALinear(nn.Linear(d_in, d_out), TASKS, k_common, k_specific, r_e, alpha=8.0, input_gate=input_gate)
    randomize([layer], seed)
    return layer


def reference(layer, x, ids):
    """The float64 loop: y = base(x) + scaling * sum over the task's experts of g * B A x."""
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = layer.lora_A.double(), layer.lora_B.double()
    out = []
    for xi, t in zip(x.double(), ids.tolist()):  # xi: [T, d_in]
        y = xi @ W.T + b
        if t >= 0:
            logits = layer.gate_logits.double()[t].expand(xi.shape[0], -1)  # [T, K]
            if layer.gate_proj is not None:
                logits = logits + xi @ layer.gate_proj.double()[t].T
            g = torch.softmax(logits, dim=-1)
            for j, e in enumerate(layer.allowed[t].tolist()):
                y = y + layer.scaling * g[:, j : j + 1] * (xi @ A[e].T @ B[e].T)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("input_gate", [False, True])
def test_layer_matches_float64_loop_on_a_mixed_batch(input_gate):
    layer = make_layer(input_gate=input_gate)
    x = torch.randn(5, 4, 16)
    ids = torch.tensor([2, 0, -1, 1, 0])
    layer.routing.ids = ids
    assert_close(layer(x).double(), reference(layer, x, ids), rtol=1e-5, atol=1e-5)


def test_per_token_ids_equal_per_row_ids():
    layer = make_layer()
    x = torch.randn(3, 4, 16)
    layer.routing.ids = torch.tensor([1, 2, 0])
    rows = layer(x)
    layer.routing.ids = torch.tensor([1, 2, 0]).unsqueeze(1).expand(3, 4).clone()
    assert_close(layer(x), rows)
    layer.routing.ids = None
    assert_close(layer(x), layer.base_layer(x))


def test_gate_weights_are_a_softmax_over_common_and_own_experts():
    layer = make_layer(k_common=2, k_specific=2)
    table = layer.gate_table()  # [T, E] with E = 2 + 3 * 2
    assert table.shape == (3, 8)
    assert_close(table.sum(dim=1), torch.ones(3))
    for t in range(3):
        own = {0, 1, 2 + 2 * t, 3 + 2 * t}
        assert all(table[t, e] > 0 for e in own)
        assert all(table[t, e] == 0 for e in range(8) if e not in own)
    gates = layer.token_gates(torch.tensor([0, 2, -1]), torch.randn(3, 16))
    assert_close(gates[:2], table[[0, 2]])
    assert (gates[2] == 0).all()


def test_handle_gate_weights_for_the_heatmap(folders):
    handle = inject_cgc(load(folders, "bert"), TASKS, r=4, alpha=8, k_common=1, k_specific=2)
    randomize(handle.layers.values())
    weights = handle.gate_weights()
    assert set(weights) == set(handle.layers)
    assert handle.expert_labels() == ["common0", "specific0", "specific1"]
    for per_task in weights.values():
        assert set(per_task) == set(TASKS)
        for g in per_task.values():
            assert len(g) == 3 and abs(sum(g) - 1) < 1e-6 and min(g) > 0


@pytest.mark.parametrize("input_gate", [False, True])
def test_absent_tasks_experts_get_exactly_zero_gradient(input_gate):
    layer = make_layer(input_gate=input_gate)
    layer.routing.ids = torch.tensor([0, 1, 0, 1])  # no row of task 2
    layer(torch.randn(4, 5, 16)).square().sum().backward()
    absent = layer.allowed[2, layer.k_common :]  # task 2's specific experts
    present = layer.allowed[0]
    for p in (layer.lora_A.grad, layer.lora_B.grad):
        assert (p[absent] == 0).all()
        assert all(p[e].abs().sum() > 0 for e in present.tolist())
    assert (layer.gate_logits.grad[2] == 0).all() and layer.gate_logits.grad[0].abs().sum() > 0
    if input_gate:
        assert (layer.gate_proj.grad[2] == 0).all()


def test_absent_task_gets_zero_gradient_through_a_model(folders):
    torch.manual_seed(0)
    model = load(folders, "bert")
    handle = inject_cgc(model, TASKS, r=4, alpha=8)
    randomize(handle.layers.values())
    with use_tasks(handle, ["intent", "slots", "slots", "intent"]):
        model(input_ids=input_ids()).last_hidden_state.square().sum().backward()
    for layer in handle.layers.values():
        own = layer.allowed[2, layer.k_common :]
        assert (layer.lora_A.grad[own] == 0).all() and (layer.lora_B.grad[own] == 0).all()
        assert layer.lora_B.grad[0].abs().sum() > 0  # the common expert learns
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)


def test_parameter_budget_matches_plain_lora_per_task(folders):
    """Per layer: (k_c + T k_s) r_e (d_in + d_out) + T (k_c + k_s); per task: the plain
    LoRA of rank r = (k_c + k_s) r_e plus its k_c + k_s gate logits."""
    r, T = 8, len(TASKS)
    assert cgc_ranks(8, 1, 1) == 4 and cgc_ranks(8, 2, 1) == 2 and cgc_ranks(3, 1, 1) == 1
    with pytest.raises(TasktuneError):
        cgc_ranks(1, 1, 1)
    cgc = inject_cgc(load(folders, "llama"), TASKS, r=r, alpha=16)
    plain = inject_lora(load(folders, "llama"), ["one"], r=r, alpha=16)
    assert set(cgc.layers) == set(plain.layers)
    for path, layer in cgc.layers.items():
        d = layer.in_features + layer.out_features
        per_layer = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert per_layer == (1 + T * 1) * 4 * d + T * 2
        assert per_layer <= 2 * r * d + 2 * T  # T=3: twice one plain LoRA, 2/3 of `single`
    assert cgc.trainable_parameter_count("intent") == plain.trainable_parameter_count("one") + 2 * len(cgc.layers)
    assert cgc.trainable_parameter_count() == sum(p.numel() for p in cgc.parameters())


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_folded_adapters_loaded_by_peft_match_cgc(folders, family, tmp_path):
    torch.manual_seed(0)
    pristine = load(folders, family)
    model = copy.deepcopy(pristine)
    handle = inject_cgc(model, TASKS, r=4, alpha=8, k_common=1, k_specific=1)
    randomize(handle.layers.values())
    ids = input_ids()
    base = run(pristine, family, ids)
    for task in TASKS:
        with use_tasks(handle, task):
            ours = run(model, family, ids)
        folder = save_folded_adapter(handle, task, tmp_path / task, str(folders[family]), CASES[family][1])
        peft_model = PeftModel.from_pretrained(copy.deepcopy(pristine), folder).eval()
        theirs = run(peft_model, family, ids)
        assert rel_err(ours, theirs) <= 1e-5
        assert rel_err(base, theirs) > 1e-3  # the adapter does change the output
    # a mixed batch routes each row to its own task's mixture
    mixed_tasks = ["slots", "summary", "intent", "slots"]
    with use_tasks(handle, mixed_tasks):
        mixed = run(model, family, ids)
    for i, task in enumerate(mixed_tasks):
        with use_tasks(handle, task):
            alone = run(model, family, ids[i : i + 1])
        assert rel_err(mixed[i : i + 1], alone) <= 1e-5
    with use_adapters(handle, mixed_tasks):  # the runner's router works on a CGC handle as is
        assert_close(run(model, family, ids), mixed)
    # tasktune's own reader serves the folded folders like any other adapters
    served = load(folders, family)
    lora = load_adapters(served, {t: tmp_path / t for t in TASKS})
    with use_adapters(lora, mixed_tasks):
        assert rel_err(run(served, family, ids), mixed) <= 1e-5


def test_fold_shapes_and_folded_rank():
    layer = make_layer(k_common=2, k_specific=1, r_e=3)
    spec = CGCSpec(r=9, alpha=8.0, k_common=2, k_specific=1, expert_rank=3)
    handle = CGCHandle({t: i for i, t in enumerate(TASKS)}, {"l": layer}, layer.routing, spec)
    A, B = fold_task(handle, "slots")["l"]  # rank 2 common + 1 own experts of rank 3
    assert A.shape == (9, 16) and B.shape == (12, 9)
    x = torch.randn(4, 16)
    layer.routing.ids = torch.full((4,), 1)
    assert_close(layer(x), layer.base_layer(x) + layer.scaling * x @ A.T @ B.T)


def test_input_gated_fold_raises(folders, tmp_path):
    handle = inject_cgc(load(folders, "bert"), TASKS, r=4, alpha=8, input_gate=True)
    with pytest.raises(TasktuneError, match="input-gated"):
        save_folded_adapter(handle, "intent", tmp_path / "x", str(folders["bert"]))
    assert not (tmp_path / "x").exists()


def test_errors_are_clear(folders):
    handle = inject_cgc(load(folders, "bert"), TASKS, r=4, alpha=8)
    with pytest.raises(TasktuneError, match="unknown CGC task"):
        handle.ids_tensor(["intent", "nope"])
    with pytest.raises(TasktuneError, match="out of range"):
        handle.ids_tensor(3)
    with pytest.raises(TasktuneError, match="already has LoRA"):
        inject_cgc(handle.layers[next(iter(handle.layers))], TASKS, r=4, alpha=8, target_modules=["base_layer"])
    with pytest.raises(TasktuneError):
        CGCLoRALinear(nn.Linear(4, 4), ["a", "a"], 1, 1, 2, 4.0, routing=AdapterRouting())
