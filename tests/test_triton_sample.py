"""The device-side draw (serve/triton_sample.py) against the distribution `sampling_probs`
gives (temperature, top-p, min-p), its seeding, and its writes for a decode step. Under
the Triton interpreter on the CPU (conftest), on the GPU as it is."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from tasktune.serve import triton_sample, triton_top_k
from tasktune.serve.sampling import SamplingParams, sampling_probs
from tasktune.serve.triton_sample import SamplingTable, sample_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_sample.available(DEVICE), reason="needs Triton (or its interpreter)")


def draws(logits: torch.Tensor, params: SamplingParams, n: int, key: int = 7, dtype=torch.float32) -> torch.Tensor:
    """n tokens drawn from the same row by n slots seeded 0..n-1."""
    table = SamplingTable(n, DEVICE)
    for s in range(n):
        table.set(s, params.temperature, params.top_p, params.min_p, s, params.top_k)
    x = logits.to(DEVICE, dtype).expand(n, -1).contiguous()
    idx = torch.arange(n, device=DEVICE)
    out = torch.full((n,), -1, dtype=torch.long, device=DEVICE)
    sample_rows(x, idx, idx, torch.full((n,), key, device=DEVICE), table, out)
    return out.cpu()


BF16 = torch.bfloat16  # (the top-k cases: the logits' dtype the engine draws from, and its 16-step threshold search)


@pytest.mark.parametrize("params, chunk, split_rounds, dtype", [
    (SamplingParams(temperature=1.0), 4096, 2, torch.float32),
    (SamplingParams(temperature=0.7, top_p=0.8), 16, 2, torch.float32),  # 3 chunks a row (the last one short)
    (SamplingParams(temperature=1.3, top_p=0.9, min_p=0.1), 16, 1, torch.float32),  # the per-row loop checks min-p rows
    (SamplingParams(temperature=1.0, min_p=0.3), 8, 2, torch.float32),
    (SamplingParams(temperature=1.2, top_k=5), 16, 2, BF16),
    (SamplingParams(temperature=0.9, top_k=12, min_p=0.05), 8, 1, BF16),
    (SamplingParams(temperature=1.1, top_k=9, top_p=0.7), 16, 1, BF16)],
    ids=["t", "t+top_p", "all", "min_p", "top_k", "top_k+min_p", "top_k+top_p"])
def test_draws_follow_the_filtered_distribution(params, chunk, split_rounds, dtype, monkeypatch):
    monkeypatch.setattr(triton_sample, "CHUNK", chunk)
    monkeypatch.setattr(triton_sample, "SPLIT_ROUNDS", split_rounds)
    torch.manual_seed(0)
    logits = (torch.randn(40) * 1.5).to(dtype).float()
    logits[5] = float("-inf")  # a banned token is never drawn
    check_draws(logits, params, dtype)


def check_draws(logits: torch.Tensor, params: SamplingParams, dtype=torch.float32) -> None:
    """Draws from one row fit `sampling_probs`'s distribution, and only with its filters."""
    want = sampling_probs(logits.clone(), params)
    want = want / want.sum()
    n = 8000 if DEVICE == "cuda" else 200 if params.top_k else 300  # (the interpreter takes ~20-100 ms a draw)
    counts = torch.bincount(draws(logits, params, n, dtype=dtype), minlength=len(logits)).double()
    assert counts[want == 0].sum() == 0  # nothing outside the filtered support
    assert fit(counts, want) > 1e-4  # chi-square: the counts are a sample of `want`
    unfiltered = torch.softmax(logits.double(), -1)
    if params.top_p < 1 or params.min_p > 0 or params.top_k > 0:  # the filters are what makes it fit
        assert fit(counts, unfiltered) < 1e-6


@pytest.mark.parametrize("top_k", [5, 3], ids=["k above the room: rejection rounds", "ties past a chunk's room"])
def test_top_k_past_the_candidates_room(top_k, monkeypatch):
    """A chunk keeps at most TOP_K candidates: a larger k leaves the row to the rejection
    rounds; ties at the row's k-th logit past a chunk's room are counted at its weight and
    found in the chunk when drawn. Either way, the same distribution."""
    monkeypatch.setattr(triton_sample, "CHUNK", 16)
    monkeypatch.setattr(triton_top_k, "TOP_K", 4)
    torch.manual_seed(2)
    logits = torch.randn(40).to(BF16).float()
    logits[16:22] = 2.5  # six ties in the second chunk, all among its top 3
    check_draws(logits, SamplingParams(temperature=1.0, top_k=top_k), BF16)


def fit(counts: torch.Tensor, p: torch.Tensor) -> float:
    """The chi-square test's p-value of counts against probabilities p (tokens expected
    fewer than 5 times pooled into one cell)."""
    expected = p.double() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()).pvalue)


@pytest.mark.parametrize("chunk", [4096, 64], ids=["one chunk", "5 chunks"])
def test_seed_and_key_decide_the_token_and_degenerate_rows_keep_the_argmax(chunk, monkeypatch):
    monkeypatch.setattr(triton_sample, "CHUNK", chunk)
    torch.manual_seed(1)
    logits = torch.randn(300)
    p = SamplingParams(temperature=1.0, top_p=0.95)
    a, b = draws(logits, p, 64), draws(logits, p, 64)
    assert torch.equal(a, b)  # the same seeds and positions: the same tokens
    assert not torch.equal(a, draws(logits, p, 64, key=8))  # the next position draws afresh
    assert torch.equal(draws(logits, p, 64, dtype=torch.bfloat16), draws(logits.bfloat16().float(), p, 64))
    tiny = draws(logits, SamplingParams(temperature=1e-300), 8)
    assert (tiny == logits.argmax()).all()
    assert (draws(logits, SamplingParams(temperature=1.0, top_p=1e-6), 8) == logits.argmax()).all()
    assert (draws(logits, SamplingParams(temperature=1.0, top_k=1), 8) == logits.argmax()).all()
    nan = torch.full((300,), float("nan"))
    assert (draws(nan, SamplingParams(temperature=1.0), 2) == 0).all()


def test_a_decode_step_writes_the_next_input_tokens_by_slot():
    torch.manual_seed(2)
    logits = torch.randn(6, 50, device=DEVICE)
    table = SamplingTable(6, DEVICE)
    for s in range(6):
        table.set(s, 1.0, 1.0, 0.0, 100 + s)
    out = logits.argmax(-1)
    tokens = torch.zeros(6, dtype=torch.long, device=DEVICE)
    positions = torch.arange(10, 16, device=DEVICE)
    slots = torch.tensor([1, 4], device=DEVICE)
    sample_rows(logits, slots, slots, positions, table, out, tokens)
    greedy = logits.argmax(-1)
    assert torch.equal(out[[0, 2, 3, 5]], greedy[[0, 2, 3, 5]]) and torch.equal(tokens[[0, 2, 3, 5]].cpu(), torch.zeros(4, dtype=torch.long))
    assert torch.equal(tokens[[1, 4]], out[[1, 4]])
    # row 4 alone, keyed by its position: the same token as beside row 1
    alone = torch.zeros(6, dtype=torch.long, device=DEVICE)
    sample_rows(logits, slots[1:], slots[1:], positions, table, alone, torch.zeros(6, dtype=torch.long, device=DEVICE))
    assert alone[4] == out[4]


@pytest.mark.skipif(not triton_sample.available("cpu"), reason="CPU engines draw through Triton's interpreter (no GPU)")
def test_sampled_requests_draw_on_the_device_path_whatever_their_batch(engine):
    """Sampled rows (temperature, top-p, min-p, top-k, top-k with top-p) draw right after each step and the
    step after it is launched ahead, none discarded. A seeded request's tokens (and log-probabilities)
    are the same alone, beside greedy rows and arrivals, and beside a row with a penalty,
    whose batch takes the logits path (where the same draw serves it); seeds differ, tokens do."""
    check_sampled_requests(engine)


def check_sampled_requests(engine):
    from tasktune.serve.engine import Request
    from tasktune.serve.sampling import SamplingParams

    p = SamplingParams(max_tokens=10, temperature=1.2, top_p=0.9, min_p=0.02, seed=42, logprobs=1, ignore_eos=True)
    top_k = Request("call mom", "task-0", SamplingParams(max_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=7,
                                                          ignore_eos=True))
    step = engine.decode_step
    used, wasted = step.ahead_used, step.ahead_wasted
    alone = engine.generate([Request("play some jazz", "task-1", p)])[0]
    alone_k = engine.generate([top_k])[0]
    assert step.ahead_used - used >= 14 and step.ahead_wasted == wasted
    greedy = [Request("book a table", None, SamplingParams(max_tokens=n)) for n in (3, 12, 6)]
    unseeded = Request("is it raining", "task-2", SamplingParams(max_tokens=7, temperature=1.0))
    mixed = engine.generate([greedy[0], Request("play some jazz", "task-1", p), unseeded, *greedy[1:], top_k])
    assert step.ahead_wasted == wasted
    assert mixed[-1].token_ids == alone_k.token_ids  # (top-k + top-p on the device path too)
    penalized = engine.generate([Request("play some jazz", "task-1", p),
                                 Request("call mom", "task-3", SamplingParams(max_tokens=10, repetition_penalty=1.3))])
    for other in (mixed[1], penalized[0]):
        assert other.token_ids == alone.token_ids
        assert [lp.token for lp in other.logprobs] == alone.token_ids
        assert [lp.logprob for lp in other.logprobs] == pytest.approx([lp.logprob for lp in alone.logprobs], abs=1e-4)
    seeds = {tuple(engine.generate([Request("play some jazz", "task-1", SamplingParams(
        max_tokens=10, temperature=1.2, seed=s, ignore_eos=True))])[0].token_ids) for s in range(4)}
    assert len(seeds) > 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sampled_requests_on_the_gpu_beside_graph_decoding(tiny_llama, adapter_root):
    """The same on a GPU (bf16, CUDA graphs, steps launched ahead)."""
    from tasktune.serve.engine import Engine

    eng = Engine.from_pretrained(tiny_llama, adapter_root=adapter_root, max_resident=4, max_rank=8,
                                 max_running=8, max_len=128, device="cuda", dtype=torch.bfloat16)
    eng.pool.register_root()
    check_sampled_requests(eng)
