"""The padded prefill (`prefill_graphs.PrefillStep`) against the ragged prefill.

The CPU runs the padded step eagerly, the layout a GPU captures in CUDA graphs: its last
token's logits and the keys and values it leaves in the sequence's slot must equal those
of `make_batch`'s ragged prefill, with an adapter and without, whatever the bucket.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tasktune.serve.engine import Engine
from tasktune.serve.forward_batch import make_batch
from tasktune.serve import prefill_graphs
from tasktune.serve.prefill_graphs import BUCKETS, PrefillStep

from tiny_models import tiny_engine


@pytest.fixture(scope="module")
def engine(tiny_llama, adapter_root) -> Engine:
    eng = tiny_engine(tiny_llama, adapter_root, max_running=4, max_len=200)
    eng.prefill_step.pad = True  # the padded layout a GPU captures, run eagerly (the CPU runs each prompt's length)
    return eng


@pytest.mark.parametrize("length,adapter", [(5, None), (5, "task-1"), (BUCKETS[0] + 3, "task-2"), (199, None)])
def test_padded_prefill_equals_ragged_prefill(engine, length, adapter):
    model, cache, stacks = engine.model, engine.cache, engine.pool.stacks
    step = engine.prefill_step
    lora_id = engine.pool.acquire(adapter) if adapter else -1
    prompt = torch.randint(3, model.cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    assert step.takes([length]) and step.bucket(length) >= length
    try:
        want = model(make_batch([prompt], [0], [1], [lora_id], engine.device), cache, stacks)
        keys, values = cache.k[:, 1, :, :length].clone(), cache.v[:, 1, :, :length].clone()
        cache.k[:, 2].normal_()  # stale keys from an earlier sequence in the slot must not matter
        got = step([prompt], [2], [lora_id])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.k[:, 2, :, :length], keys)
        torch.testing.assert_close(cache.v[:, 2, :, :length], values)
    finally:
        if adapter:
            engine.pool.release(adapter)


def test_padded_prefill_gives_every_rows_hidden_state_for_scoring(engine):
    """PrefillStep.hidden (prompt scoring's path): each prompt's rows out of the last layer,
    in the order given, equal to the ragged prefill's with head=False and no last rows."""
    model, cache, stacks = engine.model, engine.cache, engine.pool.stacks
    ids = [engine.pool.acquire("task-3"), -1]
    prompts = [torch.randint(3, model.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (7, BUCKETS[0] + 5)]
    try:
        got = engine.prefill_step.hidden(prompts, [1, 2], ids)
        for prompt, lora_id, rows in zip(prompts, ids, got):
            batch = make_batch([prompt], [0], [3], [lora_id], engine.device)
            want = model(replace(batch, last=None), cache, stacks, head=False)
            assert rows.shape == (len(prompt), model.cfg.hidden_size)
            torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-5)
    finally:
        engine.pool.release("task-3")


def test_compiled_padded_prefill_equals_ragged_prefill(tiny_llama, adapter_root):
    """With a compiled decoder (compile_decode; aot_eager here) the padded prefill's blocks
    run through the compiled block too (decoder.COMPILE_PREFILL), to the same logits."""
    eng = Engine.from_pretrained(tiny_llama, adapter_root=adapter_root, max_resident=4, max_rank=8,
                                 max_running=4, max_len=200)
    eng.pool.register_root()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eng.model.compile_decode(backend="aot_eager")
    lora_id = eng.pool.acquire("task-1")
    for length, ids in ((9, lora_id), (70, -1)):
        prompt = torch.randint(3, eng.model.cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(3)).tolist()
        want = eng.model(make_batch([prompt], [0], [1], [ids], eng.device), eng.cache, eng.pool.stacks)
        torch.testing.assert_close(eng.prefill_step([prompt], [2], [ids]), want, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    eng.pool.release("task-1")


def test_which_prefills_it_takes(engine):
    step = engine.prefill_step
    assert step.top == min(BUCKETS[-1], engine.cache.max_len) == 200
    assert [step.bucket(n) for n in (1, 32, 33, 150, 200)] == [32, 32, 64, 200, 200]
    assert not step.takes([]) and not step.takes([201])
    assert not step.takes([4, 4])  # eager on the CPU: several sequences as one ragged batch
    assert step.shapes() == []  # no graphs on the CPU


def test_graph_shapes_a_gpu_captures(engine):
    """Every bucket (200: the top, max_len) with 8, 4, 2, 1 sequences within MAX_TOKENS, with
    and without adapters: what `warmup` captures and its progress bar counts."""
    step = PrefillStep(engine.model, engine.cache, engine.pool.stacks, use_graphs=False)
    step.use_graphs, step.max_seqs = True, 8
    shapes = step.shapes()
    assert len(shapes) == len(set(shapes)) == 4 * 4 * 2
    assert {T for _, T, _ in shapes} == {32, 64, 128, 200} and (8, 200, True) in shapes
    assert all(n * T <= prefill_graphs.MAX_TOKENS for n, T, _ in shapes)


def test_groups_longest_first_within_the_captured_shapes(engine, monkeypatch):
    monkeypatch.setattr(prefill_graphs, "MAX_TOKENS", 128)
    step = PrefillStep(engine.model, engine.cache, engine.pool.stacks, use_graphs=False)
    step.max_seqs, step.pad = 8, True
    assert [step.sizes(T) for T in (32, 64, 128, 200)] == [[4, 2, 1], [2, 1], [1], [1]]
    assert step.groups([5, 70, 40, 3, 33, 10, 7]) == [[1], [2, 4], [5, 6, 0, 3]]
    cpu = PrefillStep(engine.model, engine.cache, None, use_graphs=False)
    assert cpu.groups([3, 9]) == [[1], [0]] and cpu.bucket(37) == 37  # the CPU: one at a time, unpadded


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("lengths", [[5, 40, 33, 20], [150, 9, 30]], ids=["one replay of 4", "2 + 1, top bucket"])
def test_several_padded_prefills_equal_ragged_prefills(engine, lengths, kernels):
    """Several prompts in one padded step (each one segment of its bucket's rows, mixed
    adapters and none): each one's logits and KV equal its ragged prefill alone. With
    kernels, LoRA through the segmented pair where the bucket tiles into 16-row blocks
    (64) and the BGMV pair where it does not (200, the top bucket), under the interpreter."""
    from tasktune.lora import triton_ops

    if kernels and not triton_ops.available("cpu"):
        pytest.skip("Triton's interpreter is not available")
    model, cache = engine.model, engine.cache
    adapters = ["task-1", None, "task-2", "task-1"][:len(lengths)]
    ids = [engine.pool.acquire(a) if a else -1 for a in adapters]
    stacks = replace(engine.pool.stacks, kernels=kernels)
    step = PrefillStep(model, cache, stacks, use_graphs=False)
    step.max_seqs, step.bgmv, step.pad = 4, kernels, True
    g = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    try:
        want, kv = [], []
        for p, i in zip(prompts, ids):
            want.append(model(make_batch([p], [0], [0], [i], engine.device), cache, stacks))
            kv.append((cache.k[:, 0, :, :len(p)].clone(), cache.v[:, 0, :, :len(p)].clone()))
        cache.k.normal_()
        slots = list(range(len(prompts)))[::-1]
        got = step(prompts, slots, ids)
        tol = dict(rtol=1e-4, atol=1e-4) if kernels else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, torch.cat(want), **tol)
        for p, slot, (k, v) in zip(prompts, slots, kv):
            torch.testing.assert_close(cache.k[:, slot, :, :len(p)], k, **tol)
            torch.testing.assert_close(cache.v[:, slot, :, :len(p)], v, **tol)
    finally:
        for a in adapters:
            if a:
                engine.pool.release(a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_prefill_graph_replays_equal_eager_steps(tiny_llama, adapter_root):
    """On a GPU, bf16: each replay gives exactly the logits and KV entries of the same padded
    step run eagerly with the same kernels (LoRA through the BGMV pair), for prompts of
    several lengths and adapters one after another through the same graphs; and the
    engine's greedy tokens with graphed prefills equal those with that eager step."""
    from tasktune.serve.engine import Request
    from tasktune.serve.sampling import SamplingParams

    eng = Engine.from_pretrained(tiny_llama, adapter_root=adapter_root, max_resident=4, max_rank=8,
                                 max_running=8, max_len=300, device="cuda", dtype=torch.bfloat16)
    eng.pool.register_root()
    step = eng.prefill_step
    assert step.use_graphs and step.bgmv and eng.pool.stacks.kernels
    eager = PrefillStep(eng.model, eng.cache, eng.pool.stacks, use_graphs=False)
    eager.bgmv = eager.pad = True  # the graphs' step, run eagerly
    g = torch.Generator().manual_seed(0)
    for length, adapter in ((7, "task-1"), (40, None), (9, "task-3"), (250, "task-1")):
        lora_id = eng.pool.acquire(adapter) if adapter else -1
        prompt = torch.randint(3, eng.model.cfg.vocab_size, (length,), generator=g).tolist()
        want = eager([prompt], [1], [lora_id])
        got = step([prompt], [0], [lora_id])
        assert torch.equal(got, want)
        assert torch.equal(eng.cache.k[:, 0, :, :length], eng.cache.k[:, 1, :, :length])
        assert torch.equal(eng.cache.v[:, 0, :, :length], eng.cache.v[:, 1, :, :length])
        if adapter:
            eng.pool.release(adapter)
    assert sorted(step.graphs) == [(1, 32, True), (1, 64, False), (1, 256, True)]  # shapes x adapters, made on first use
    eager.max_seqs = step.max_seqs
    adapters = ["task-1", None, "task-3", "task-1", "task-2"]
    ids = [eng.pool.acquire(a) if a else -1 for a in adapters]
    prompts = [torch.randint(3, eng.model.cfg.vocab_size, (n,), generator=g).tolist() for n in (60, 7, 100, 33, 64)]
    want = eager(prompts, [1, 2, 3, 4, 5], ids)  # (4 prompts of bucket 128 in one replay, then one of 32)
    got = step(prompts, [0, 6, 7, 3, 2], ids)
    assert torch.equal(got, want)
    assert (4, 128, True) in step.graphs
    for a in adapters:
        if a:
            eng.pool.release(a)
    jobs = [("hello world", "task-0"), ("the cat sat", None), ("a b c d e f", "task-2")]
    outs = {}
    for graphs in (True, False):
        step.use_graphs = graphs  # (use_graphs False with bgmv: the same step eagerly)
        step.max_seqs = eager.max_seqs  # (takes several prompts at once either way)
        alone = [eng.generate([Request(p, a, SamplingParams(max_tokens=6))])[0].token_ids for p, a in jobs]
        together = [r.token_ids for r in eng.generate([Request(p, a, SamplingParams(max_tokens=6)) for p, a in jobs])]
        outs[graphs] = (alone, together)
    step.use_graphs = True
    assert outs[True] == outs[False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_long_prompt_graph_replay_equals_eager_step(tiny_llama, adapter_root, tmp_path):
    """A prompt past 1,024 tokens replays the 2,048 bucket's graph (one prompt), as the same
    step run eagerly; the engine captures every shape up front (what the progress bar counts)."""
    import json
    import shutil

    model = shutil.copytree(tiny_llama, tmp_path / "long" / tiny_llama.name)  # the tiny Llama, 4,096 positions
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    eng = Engine.from_pretrained(model, adapter_root=adapter_root, max_resident=4, max_rank=8,
                                 max_running=4, max_len=2100, device="cuda", dtype=torch.bfloat16)
    eng.pool.register_root()
    step = eng.prefill_step
    assert step.top == 2048 and eng.warmup(progress=True) == (len(step.graphs) + len(eng.decode_step.graphs)
                                                              + len(eng.branch_step.graphs))
    assert len(eng.branch_step.graphs) == len(eng.branch_step.shapes()) == 12  # 6 buckets, with and without LoRA
    assert set(step.shapes()) == set(step.graphs)
    eager = PrefillStep(eng.model, eng.cache, eng.pool.stacks, use_graphs=False)
    eager.bgmv = eager.pad = True  # the graphs' step, run eagerly
    lora_id = eng.pool.acquire("task-1")
    prompt = torch.randint(3, eng.model.cfg.vocab_size, (1500,), generator=torch.Generator().manual_seed(1)).tolist()
    assert torch.equal(step([prompt], [0], [lora_id]), eager([prompt], [1], [lora_id]))
    assert torch.equal(eng.cache.k[:, 0, :, :1500], eng.cache.k[:, 1, :, :1500])
    eng.pool.release("task-1")
