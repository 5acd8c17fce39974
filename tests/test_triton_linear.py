"""The fused decode linear (tasktune/serve/triton_linear.py) against eager torch.

On the CPU it runs under the Triton interpreter (TRITON_INTERPRET=1, conftest), where
programs run one at a time in order; on a GPU (bench/gpu_all.sh's kernel tests) for real,
with programs in flight together (the split-K and shrink counters matter there).
The reference computes the same function in float64 from the same inputs: RMSNorm, the
projection, each row's LoRA delta (per module of a fused linear), silu(gate) * up and the
residual. The kernel rounds where eager bf16 rounds, and the interpreter casts fp32 -> bf16
by truncation, so bf16 compares with a tolerance of a few ulps of the output's magnitude.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from graph_replay import assert_graph_with_pdl_equals_eager
from tasktune.serve import triton_linear
from tasktune.serve.triton_linear import decode_linear, linear_config

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not triton_linear.available(DEVICE),
                                reason="Triton cannot run here (no CUDA, and TRITON_INTERPRET is not 1)")


def reference(x, W, bias=None, residual=None, norm=None, swiglu=False, lora=None, bounds=()):
    d = torch.float64
    h = x.to(d)
    if norm is not None:
        h = norm[0].to(d) * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm[1])
    y = h @ W.to(d).T + (bias.to(d) if bias is not None else 0)
    if lora is not None:
        A, B, scaling, ids = lora
        r = B.shape[2]
        edges = [0, *bounds, W.shape[0]]
        for m, slot in enumerate(ids.tolist()):
            if slot < 0:
                continue
            for i in range(len(edges) - 1):
                hm = A[slot, i * r:(i + 1) * r].to(d) @ h[m]
                y[m, edges[i]:edges[i + 1]] += scaling[slot].to(d) * (B[slot, edges[i]:edges[i + 1]].to(d) @ hm)
    if swiglu:
        n = W.shape[0] // 2
        y = F.silu(y[:, :n]) * y[:, n:]
    return y + residual.to(d) if residual is not None else y


def make(M, rows, K, *, dtype, bias=False, residual=False, norm=False, swiglu=False, modules=0, seed=0, slots=4):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE, dtype)  # noqa: E731
    N = rows // 2 if swiglu else rows
    args = dict(x=rnd(M, K), W=rnd(rows, K, scale=K ** -0.5), bias=rnd(rows) if bias else None,
                residual=rnd(M, N) if residual else None,
                norm=((torch.rand(K, generator=g) + 0.5).to(DEVICE, dtype), 1e-6) if norm else None, swiglu=swiglu)
    if modules:
        r = 8
        bounds = (N,) if swiglu else tuple(sorted(torch.randperm(rows - 1, generator=g)[:modules - 1].add(1).tolist()))
        # B stored rank-major, as the adapter pool keeps it
        B = rnd(slots, r, rows).transpose(1, 2)
        ids = torch.randint(-1, slots, (M,), generator=g)
        ids[0] = 1  # at least one row with an adapter
        args.update(lora=(rnd(slots, modules * r, K, scale=K ** -0.5), B,
                          (torch.rand(slots, generator=g) + 0.5).to(DEVICE), ids.to(DEVICE)), bounds=bounds)
    return args


def check(args, dtype, config=None):
    got = decode_linear(args["x"], args["W"], args["bias"], args["residual"], norm=args["norm"], swiglu=args["swiglu"],
                        lora=args.get("lora"), bounds=args.get("bounds", ()), config=config)
    want = reference(**args)
    assert got.dtype == dtype and got.shape == want.shape
    scale = want.abs().max().item()
    # fp32: tl.dot runs in TF32 on a GPU (~1e-3 relative), exact fp32 under the interpreter
    tol = (1e-5 if INTERPRET else 5e-3) * scale if dtype == torch.float32 else 3e-2 * scale
    assert (got.double() - want).abs().max().item() <= tol
    assert int(triton_linear._counter_buffer(got.device).abs().sum()) == 0  # every launch leaves them at zero


CASES = {  # M, weight rows, K, options
    "plain": (5, 96, 80, {}),
    "bias": (3, 64, 300, dict(bias=True)),
    "residual+split": (32, 160, 256, dict(residual=True)),
    "norm": (16, 120, 96, dict(norm=True, bias=True)),
    "lora": (7, 64, 48, dict(residual=True, modules=1)),
    "lora fused 3 modules+norm": (16, 120, 96, dict(norm=True, bias=True, modules=3)),
    "lora long K (shrink split)": (6, 64, 2100, dict(residual=True, norm=True, modules=1)),
    "swiglu+norm": (4, 96, 64, dict(norm=True, swiglu=True)),
    "swiglu+norm+lora": (9, 128, 64, dict(norm=True, swiglu=True, modules=2)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_eager_reference(name, dtype):
    M, rows, K, opts = CASES[name]
    check(make(M, rows, K, dtype=dtype, **opts), dtype)


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_k_splits_sum_to_the_same_result(split_k):
    """Split-K programs store partials and the last to arrive sums them: any split count
    (including one that leaves an empty last split) gives the one-program result."""
    args = make(8, 96, 320, dtype=torch.float32, residual=True, norm=True, modules=1)
    check(args, torch.float32, config=linear_config(8, 96, 320, True, block_n=32, block_k=64, split_k=split_k))


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_many_distinct_adapters_in_chunks_over_splits(split_k):
    """More distinct adapters than one expand product takes (4 of rank 8): each split
    handles its chunks of the batch's distinct adapters, whatever their order in the rows."""
    args = make(40, 96, 192, dtype=torch.float32, norm=True, modules=3, slots=24, seed=5)
    ids = args["lora"][3]
    assert len(set(ids.tolist()) - {-1}) > 8
    check(args, torch.float32, config=linear_config(40, 96, 192, True, block_n=32, block_k=64, split_k=split_k))


@pytest.mark.parametrize("name", [n for n, (_, _, _, opts) in CASES.items() if opts.get("modules")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_k", [0, 3])
@pytest.mark.parametrize("rms_in_linear", [False, True], ids=["delta_normed", "rms_in_linear"])
def test_lora_delta_from_the_bgmv_pair_joins_the_projection(name, dtype, split_k, rms_in_linear):
    """The decoder's default LoRA path: the BGMV pair computes each row's delta (the RMSNorm
    inside its shrink, lora.triton_ops.lora_delta), which the fused launch adds before
    rounding, SwiGLU and the residual: the same function as LoRA inside the launch."""
    from tasktune.lora.triton_ops import lora_delta

    M, rows, K, opts = CASES[name]
    args = make(M, rows, K, dtype=dtype, **opts)
    A, B, scaling, ids = args["lora"]
    delta = lora_delta(args["x"], A, B, scaling, ids, args["bounds"], args["norm"], rms=not rms_in_linear)
    assert delta.dtype == torch.float32 and delta.shape == (M, rows)
    assert not delta[ids < 0].any()  # rows without an adapter: exactly 0
    N = rows // 2 if args["swiglu"] else rows
    config = linear_config(M, N, K, split_k=split_k, block_k=64) if split_k else None
    got = decode_linear(args["x"], args["W"], args["bias"], args["residual"], norm=args["norm"],
                        swiglu=args["swiglu"], delta=delta, delta_rms=not rms_in_linear, config=config)
    want = reference(**args)
    scale = want.abs().max().item()
    tol = (1e-5 if INTERPRET else 5e-3) * scale if dtype == torch.float32 else 3e-2 * scale
    assert (got.double() - want).abs().max().item() <= tol
    with pytest.raises(ValueError, match="delta"):
        decode_linear(args["x"], args["W"], delta=delta[:, :-1].contiguous())


def test_rows_without_adapter_equal_the_base_projection():
    args = make(6, 64, 48, dtype=torch.float32, modules=1)
    args["lora"][3].fill_(-1)
    base = decode_linear(args["x"], args["W"])
    got = decode_linear(args["x"], args["W"], lora=args["lora"])
    torch.testing.assert_close(got, base, rtol=0, atol=0)


def test_rejects_what_it_cannot_run():
    x, W = torch.zeros(4, 32, device=DEVICE), torch.zeros(16, 32, device=DEVICE)
    with pytest.raises(ValueError, match="rows: decode_linear takes 1..64"):
        decode_linear(torch.zeros(65, 32, device=DEVICE), W)
    with pytest.raises(ValueError, match="shapes"):
        decode_linear(torch.zeros(4, 31, device=DEVICE), W)
    with pytest.raises(ValueError, match="residual"):
        decode_linear(x, W, residual=torch.zeros(4, 15, device=DEVICE))
    with pytest.raises(ValueError, match="LoRA shapes"):
        A, B = torch.zeros(2, 8, 32, device=DEVICE), torch.zeros(2, 16, 8, device=DEVICE)
        decode_linear(x, W, lora=(A, B, torch.ones(2, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE)))


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="CUDA graphs and PDL need a GPU")
def test_chained_launches_in_a_cuda_graph_equal_eager_launches():
    """Eight dependent fused linears (norm, split-K, LoRA with its spin-wait, residual) as one
    CUDA graph with programmatic dependent launch: each launch starts while the previous one
    finishes and waits inside for it. The replays equal the same chain run eagerly
    without PDL, bit for bit, and leave the counters at zero."""
    M, D, layers = 32, 256, 8
    g = torch.Generator().manual_seed(3)
    Ws = [(torch.randn(D, D, generator=g) * D ** -0.5).to(DEVICE, torch.bfloat16) for _ in range(layers)]
    nw = (torch.rand(D, generator=g) + 0.5).to(DEVICE, torch.bfloat16)
    A = (torch.randn(4, 8, D, generator=g) * D ** -0.5).to(DEVICE, torch.bfloat16)
    B = (torch.randn(4, D, 8, generator=g) * 0.1).to(DEVICE, torch.bfloat16)
    lora = (A, B, torch.ones(4, device=DEVICE), (torch.arange(M) % 5 - 1).to(DEVICE))
    x0 = torch.randn(M, D, generator=g).to(DEVICE, torch.bfloat16)
    cfg = linear_config(M, D, D, True, block_n=32, block_k=64, split_k=4)

    def chain(x):
        for i, W in enumerate(Ws):
            x = decode_linear(x, W, residual=x, norm=(nw, 1e-6) if i % 2 else None, lora=lora, config=cfg)
        return x

    out = assert_graph_with_pdl_equals_eager(chain, x0)
    assert int(triton_linear._counter_buffer(out.device).abs().sum()) == 0


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="CUDA graphs and PDL need a GPU")
def test_linears_after_bgmv_deltas_in_a_cuda_graph_equal_eager_launches():
    """The decoder's LoRA chain: each fused linear (split-K, norm, SwiGLU, residual) after the
    BGMV pair that makes its delta, four layers as one CUDA graph with PDL. There each
    linear runs its GEMM before its wait (LATE_WAIT) beside the pair, and every kernel lets
    the next launch early (PDL_EARLY): the replays still equal the chain run eagerly
    without PDL, bit for bit, and leave the counters at zero."""
    from tasktune.lora import triton_ops

    M, D, inter, r, layers = 32, 256, 512, 16, 4
    g = torch.Generator().manual_seed(5)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, torch.bfloat16)

    W_gu, W_d = rand(2 * inter, D, scale=D ** -0.5), rand(D, inter, scale=inter ** -0.5)
    nw = (torch.rand(D, generator=g) + 0.5).to(DEVICE, torch.bfloat16)
    A_gu, B_gu = rand(4, 2 * r, D, scale=D ** -0.5), rand(4, 2 * inter, r, scale=0.1)
    A_d, B_d = rand(4, r, inter, scale=inter ** -0.5), rand(4, D, r, scale=0.1)
    scaling, ids = torch.full((4,), 2.0, device=DEVICE), (torch.arange(M) % 5 - 1).to(DEVICE)
    x0 = rand(M, D)
    cfg_gu = linear_config(M, inter, D, block_n=64, block_k=64, split_k=4)
    cfg_d = linear_config(M, D, inter, block_n=32, block_k=64, split_k=4)
    assert triton_ops.PDL_EARLY and triton_ops.LATE_WAIT

    def chain(x):
        for _ in range(layers):
            d_gu = triton_ops.lora_delta(x, A_gu, B_gu, scaling, ids, (inter,), norm=(nw, 1e-6))
            act = decode_linear(x, W_gu, norm=(nw, 1e-6), swiglu=True, delta=d_gu, config=cfg_gu)
            d_d = triton_ops.lora_delta(act, A_d, B_d, scaling, ids)
            x = decode_linear(act, W_d, residual=x, delta=d_d, config=cfg_d)
        return x

    out = assert_graph_with_pdl_equals_eager(chain, x0)
    assert int(triton_linear._counter_buffer(out.device).abs().sum()) == 0
