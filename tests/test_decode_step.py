"""The bucketed decode step (row b = KV slot b) against the general prefill layout.

`cuda_graphs.DecodeStep` runs eagerly on the CPU: the same code a GPU captures in a CUDA
graph. Its logits must equal the gathered, unpadded forward of the same tokens, whatever
slots are free (padding rows), whichever adapters the rows use, and across context
buckets. Incremental detokenisation must rebuild exactly the full decode's text.
"""

from __future__ import annotations

import pytest
import torch

from tasktune.serve.cuda_graphs import CONTEXT_STEP, DecodeStep, batch_bucket, context_bucket
from tasktune.serve.forward_batch import make_batch
from tasktune.serve.detokenize import detokenize_step
from tasktune.serve.engine import Engine
from tasktune.serve.scheduler import Sequence
from tasktune.serve.sampling import SamplingParams

from tiny_models import tiny_engine, train_tokenizer


@pytest.fixture(scope="module")
def engine(tiny_llama, adapter_root) -> Engine:
    return tiny_engine(tiny_llama, adapter_root, max_running=8, max_len=2 * CONTEXT_STEP + 16)


def test_buckets():
    assert [batch_bucket(n, 32) for n in (1, 3, 5, 17, 25, 32)] == [1, 4, 8, 24, 32, 32]
    assert batch_bucket(40, 33) == 33  # never more rows than KV slots
    assert [context_bucket(n, 300) for n in (1, 128, 129, 299)] == [128, 128, 256, 300]


@pytest.mark.parametrize("length", [5, CONTEXT_STEP + 9])  # one and two context buckets
def test_decode_layout_equals_prefill_layout(engine, length):
    model, cache, stacks = engine.model, engine.cache, engine.pool.stacks
    ids = [engine.pool.acquire(f"task-{i}") for i in range(3)]
    g = torch.Generator().manual_seed(length)
    slots = [1, 4, 6]  # slots 0, 2, 3, 5 (and 7, beyond the bucket) are free: padding rows
    lora = [ids[0], -1, ids[2]]
    prompts = [torch.randint(3, model.cfg.vocab_size, (length + k,), generator=g).tolist() for k in range(3)]
    # prefill everything but each prompt's last token, then feed that token both ways
    model(make_batch([p[:-1] for p in prompts], [0] * 3, slots, lora, engine.device), cache, stacks)
    lasts, starts = [[p[-1]] for p in prompts], [len(p) - 1 for p in prompts]
    want = model(make_batch(lasts, starts, slots, lora, engine.device), cache, stacks)
    got = engine.decode_step(slots, [p[-1] for p in prompts], starts, lora)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the padding rows wrote only position max_len - 1 of the free slots: the real rows' cache is intact
    again = engine.decode_step(slots, [p[-1] for p in prompts], starts, lora)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
    for i in range(3):
        engine.pool.release(f"task-{i}")


def test_decode_step_without_graphs_on_cpu(engine):
    assert isinstance(engine.decode_step, DecodeStep)
    assert not engine.decode_step.use_graphs and engine.warmup() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replay_equals_eager_on_gpu(tiny_llama, adapter_root):
    eng = Engine.from_pretrained(tiny_llama, adapter_root=adapter_root, max_resident=4, max_rank=8,
                                 max_running=8, max_len=256, device="cuda", dtype=torch.float32)
    eng.pool.register_root()
    a = eng.pool.acquire("task-0")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, eng.model.cfg.vocab_size, (20,), generator=g).tolist()
    eng.model(make_batch([prompt[:-1]], [0], [2], [a], eng.device), eng.cache, eng.pool.stacks)
    eager = DecodeStep(eng.model, eng.cache, eng.pool.stacks, use_graphs=False)
    want = eager([2], [prompt[-1]], [19], [a])
    assert eng.warmup() > 0
    got = eng.decode_step([2], [prompt[-1]], [19], [a])
    torch.testing.assert_close(got, want)


TEXTS = ["plain words and spaces", "accents: café naïve über", "emoji 🙂🚀 and 中文字符 mixed", "  double  spaces\nnew line"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("stream", [True, False])
def test_incremental_detokenisation_equals_full_decode(text, stream, monkeypatch):
    """Both ways: the tokenizers library's DecodeStream, and decoded windows (a tokenizer
    without a Rust backend, or an older tokenizers)."""
    from tasktune.serve import detokenize

    tok = train_tokenizer("bpe", vocab_size=300)  # byte-level: multi-byte characters span tokens
    if not stream:
        monkeypatch.setattr(detokenize, "DecodeStream", None)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    seq = Sequence(prompt_ids=[1], params=SamplingParams())
    pieces = []
    for t in ids:
        seq.output_ids.append(t)
        piece = detokenize_step(tok, seq)
        assert "\ufffd" not in piece
        pieces.append(piece)
    assert "".join(pieces) == text
    assert (seq.decode_stream is not None) == stream and (seq.read_offset > 0) != stream


def test_greedy_steps_launched_ahead_equal_fresh_steps(engine):
    """`DecodeStep.greedy(ahead=True)` computes step n+1 from step n's argmax before the host
    reads it: the tokens equal step-by-step argmax of the logits path; a step whose inputs
    differ from the assumed ones (a token the host changed) is recomputed, and the discarded
    step leaves no trace in what follows."""
    check_greedy_ahead(engine)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_greedy_steps_ahead_through_graphs_on_gpu(tiny_llama, adapter_root):
    """The same through CUDA graphs in bf16: each graph ends in the fused norm + LM head +
    argmax (triton_lm_head), which also writes the next step's inputs; a capture in the
    middle of the run (a new bucket) must leave the inputs it found."""
    eng = Engine.from_pretrained(tiny_llama, adapter_root=adapter_root, max_resident=4, max_rank=8,
                                 max_running=8, max_len=2 * CONTEXT_STEP + 16, device="cuda", dtype=torch.bfloat16)
    eng.pool.register_root()
    assert eng.model.linear_kernel and eng.decode_step.use_graphs
    check_greedy_ahead(eng)


def check_greedy_ahead(engine):
    model, cache, stacks, step = engine.model, engine.cache, engine.pool.stacks, engine.decode_step
    ids = [engine.pool.acquire(f"task-{i}") for i in range(2)]
    g = torch.Generator().manual_seed(7)
    slots, lora = [0, 3, 5], [ids[0], -1, ids[1]]
    prompts = [torch.randint(3, model.cfg.vocab_size, (9 + k,), generator=g).tolist() for k in range(3)]

    def prefill():
        model(make_batch([p[:-1] for p in prompts], [0] * 3, slots, lora, engine.device), cache, stacks)
        return [p[-1] for p in prompts], [len(p) - 1 for p in prompts]

    def reference(tokens, positions, n, swap_at=None):
        out = []
        for i in range(n):
            if i == swap_at:
                tokens = tokens[:1] + [7] + tokens[2:]
            tokens = step(slots, tokens, positions, lora).argmax(-1).tolist()
            positions = [p + 1 for p in positions]
            out.append(tokens)
        return out

    def ahead(tokens, positions, n, swap_at=None):
        out = []
        for i in range(n):
            if i == swap_at:  # the host feeds something else than the argmax the step ahead assumed
                tokens = tokens[:1] + [7] + tokens[2:]
            tokens = step.greedy(slots, tokens, positions, lora, ahead=i < n - 1)
            positions = [p + 1 for p in positions]
            out.append(tokens)
        return out

    plain = reference(*prefill(), 6)
    used, wasted = step.ahead_used, step.ahead_wasted
    assert ahead(*prefill(), 6) == plain
    assert (step.ahead_used - used, step.ahead_wasted - wasted) == (5, 0)
    want = reference(*prefill(), 6, swap_at=3)
    assert want[3:] != plain[3:]  # the swapped token changes what follows
    used, wasted = step.ahead_used, step.ahead_wasted
    assert ahead(*prefill(), 6, swap_at=3) == want
    assert (step.ahead_used - used, step.ahead_wasted - wasted) == (4, 1)
    # a freed slot (the engine calls release) holds another sequence: its row of the step ahead is not taken
    tokens, positions = prefill()
    first = step.greedy(slots, tokens, positions, lora, ahead=True)
    used, wasted = step.ahead_used, step.ahead_wasted
    step.release(slots[1])
    assert step.greedy(slots, first, [p + 1 for p in positions], lora, ahead=False) == plain[1]
    assert (step.ahead_used - used, step.ahead_wasted - wasted) == (0, 1)
    # a row at its last token is padding in the step ahead, which the other rows take; a row
    # that ends after the step ahead was launched (an end token) leaves it to the rest too
    tokens, positions = prefill()
    used, wasted = step.ahead_used, step.ahead_wasted
    out = step.greedy(slots, tokens, positions, lora, ahead=[True, False, True])
    rows = (0, 2)
    pick = lambda values, at=rows: [values[i] for i in at]  # noqa: E731
    out = step.greedy(pick(slots), pick(out), [p + 1 for p in pick(positions)], pick(lora), ahead=True)
    assert out == pick(plain[1])
    out = step.greedy([slots[0]], out[:1], [positions[0] + 2], [lora[0]], ahead=False)
    assert out == [plain[2][0]]
    assert (step.ahead_used - used, step.ahead_wasted - wasted) == (2, 0)
    assert step._active.sum().item() == 2  # (rows 0 and 2 of the last step ahead; slot 3 padding)
    for i in range(2):
        engine.pool.release(f"task-{i}")


def test_prefill_with_several_adapters_takes_the_masked_path(engine, monkeypatch):
    """Prefill with several adapters: one masked matmul pair a linear over the batch's adapters
    (serve/decoder.py, serve/decoder_lora.py) gives the logits of one matmul pair per adapter
    (the segmented path)."""
    from tasktune.lora import ops
    from tasktune.serve import decoder, decoder_lora

    model, cache, stacks = engine.model, engine.cache, engine.pool.stacks
    ids = [engine.pool.acquire(f"task-{i}") for i in range(3)]
    g = torch.Generator().manual_seed(3)
    slots, lora = [0, 2, 3, 5], [ids[0], -1, ids[2], ids[1]]
    prompts = [torch.randint(3, model.cfg.vocab_size, (5 + 3 * k,), generator=g).tolist() for k in range(4)]
    calls = []
    masked = ops.lora_delta_masked
    monkeypatch.setattr(decoder_lora, "lora_delta_masked", lambda *a: calls.append(1) or masked(*a))
    got = model(make_batch(prompts, [0] * 4, slots, lora, engine.device), cache, stacks)
    assert len(calls) == 7 * model.cfg.num_layers  # every adapted module of every layer
    monkeypatch.setattr(decoder, "PREFILL_MASKED_MAX_COLS", 0)  # force the segmented path
    want = model(make_batch(prompts, [0] * 4, slots, lora, engine.device), cache, stacks)
    assert len(calls) == 7 * model.cfg.num_layers
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for i in range(3):
        engine.pool.release(f"task-{i}")


def test_fused_linears_only_where_they_apply():
    """decode_batch turns the fused linears on only with the attention kernel's layout and
    up to triton_linear.MAX_ROWS rows (larger buckets run cuBLAS)."""
    from tasktune.serve.forward_batch import decode_batch
    from tasktune.serve.triton_linear import MAX_ROWS

    def batch(rows, attention_kernel=True, linear_kernel=True):
        z = torch.zeros(rows, dtype=torch.long)
        return decode_batch(z, z, z - 1, 16, False, attention_kernel, linear_kernel)

    assert batch(MAX_ROWS).linear_kernel and batch(1).linear_kernel
    assert not batch(MAX_ROWS + 1).linear_kernel
    assert not batch(8, attention_kernel=False).linear_kernel and not batch(8, linear_kernel=False).linear_kernel
    # the attention kernel masks by position: no mask is built; the rows' indices are made once
    assert batch(8).mask is None and batch(8).slots is batch(8).slots
    assert batch(8, attention_kernel=False).mask.shape == (8, 1, 1, 16)


def test_a_step_ahead_matches_the_rows_it_computed_as_fed():
    """`AheadStep.matches`: every row asked for must be one of its rows with the same token,
    position, adapter and slot generation; rows it has beyond those (sequences that ended
    since) do not stop the match; before its tokens are known it matches nothing."""
    from tasktune.serve.step_ahead import AheadStep

    ahead = AheadStep(slots=[0, 3, 5], lora_ids=[1, -1, 2], positions=[9, 4, 7], gens=[0, 2, 1],
                   host=torch.zeros(8, dtype=torch.long), done=None)
    rows = ([0, 3, 5], [11, 12, 13], [9, 4, 7], [1, -1, 2], [0, 2, 1])
    assert not ahead.matches(*rows)  # tokens not read yet
    ahead.tokens = [11, 12, 13]
    assert ahead.matches(*rows)
    assert ahead.matches([5, 0], [13, 11], [7, 9], [2, 1], [1, 0])  # a subset, in another order
    assert not ahead.matches([0, 3], [11, 12], [9, 4], [1, -1], [0, 3])  # slot 3 was freed and reused
    assert not ahead.matches([0, 3], [11, 99], [9, 4], [1, -1], [0, 2])  # another token fed
    assert not ahead.matches([0, 3], [11, 12], [9, 5], [1, -1], [0, 2])  # another position
    assert not ahead.matches([0, 3], [11, 12], [9, 4], [1, 4], [0, 2])  # another adapter
    assert not ahead.matches([0, 6], [11, 12], [9, 4], [1, -1], [0, 0])  # a row it did not compute
