"""The padded one-sequence prefill (`prefill_graphs.PrefillStep`) against the ragged prefill.

The CPU runs the padded step eagerly, the layout a GPU captures in CUDA graphs: its last
token's logits and the keys and values it leaves in the sequence's slot must equal those
of `make_batch`'s ragged prefill, with an adapter and without, whatever the bucket.
"""

from __future__ import annotations

import pytest
import torch

from tasktune.serve.engine import Engine
from tasktune.serve.forward_batch import make_batch
from tasktune.serve.prefill_graphs import BUCKETS, PrefillStep


@pytest.fixture(scope="module")
def engine(tiny_llama, adapter_root) -> Engine:
    eng = Engine.from_pretrained(tiny_llama, adapter_root=adapter_root, max_resident=4, max_rank=8,
                                 max_running=4, max_len=200)
    eng.pool.register_root()
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
        got = step(prompt, 2, lora_id)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.k[:, 2, :, :length], keys)
        torch.testing.assert_close(cache.v[:, 2, :, :length], values)
    finally:
        if adapter:
            engine.pool.release(adapter)


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
        torch.testing.assert_close(eng.prefill_step(prompt, 2, ids), want, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    eng.pool.release("task-1")


def test_which_prefills_it_takes(engine):
    step = engine.prefill_step
    assert step.top == min(BUCKETS[-1], engine.cache.max_len) == 200
    assert [step.bucket(n) for n in (1, 32, 33, 150, 200)] == [32, 32, 64, 200, 200]
    assert not step.takes([]) and not step.takes([201])
    assert not step.takes([4, 4])  # eager on the CPU: several sequences as one ragged batch


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
    eager.bgmv = True
    g = torch.Generator().manual_seed(0)
    for length, adapter in ((7, "task-1"), (40, None), (9, "task-3"), (250, "task-1")):
        lora_id = eng.pool.acquire(adapter) if adapter else -1
        prompt = torch.randint(3, eng.model.cfg.vocab_size, (length,), generator=g).tolist()
        want = eager(prompt, 1, lora_id)
        got = step(prompt, 0, lora_id)
        assert torch.equal(got, want)
        assert torch.equal(eng.cache.k[:, 0, :, :length], eng.cache.k[:, 1, :, :length])
        assert torch.equal(eng.cache.v[:, 0, :, :length], eng.cache.v[:, 1, :, :length])
        if adapter:
            eng.pool.release(adapter)
    assert sorted(step.graphs) == [(32, True), (64, False), (256, True)]  # buckets x adapters, made on first use
    jobs = [("hello world", "task-0"), ("the cat sat", None), ("a b c d e f", "task-2")]
    outs = {}
    for graphs in (True, False):
        step.use_graphs = graphs  # (use_graphs False with bgmv: the same step eagerly)
        outs[graphs] = [eng.generate([Request(p, a, SamplingParams(max_tokens=6))])[0].token_ids for p, a in jobs]
    step.use_graphs = True
    assert outs[True] == outs[False]
