"""The Triton BGMV kernels (tasktune/lora/triton_ops.py) against the torch gathered path.

Where they run: on the GPU when CUDA and Triton are there; on the CPU under the Triton
interpreter (`TRITON_INTERPRET=1`, Triton installed); otherwise (the project venv, CI:
no Triton) the kernel tests skip and only the fallback contract is checked.
The reference is `y + lora_delta_gathered(...)` in float64 on the same inputs, rounded
once to the dtype: the kernels accumulate in fp32 and round once. (The interpreter casts
fp32 -> bf16 by truncation, the GPU to nearest: the bf16 tolerance allows one ulp.)
"""

from __future__ import annotations

import os

import pytest
import torch

from graph_replay import assert_graph_with_pdl_equals_eager
from tasktune.lora import triton_ops
from tasktune.lora.ops import lora_delta_gathered

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

if triton_ops.triton is None:
    _why_not = "Triton is not installed (the caller uses the torch path)"
elif not triton_ops.available(DEVICE):
    _why_not = "Triton is installed but there is no CUDA device; run with TRITON_INTERPRET=1 for the CPU"
else:
    _why_not = ""
needs_kernels = pytest.mark.skipif(bool(_why_not), reason=_why_not)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3)}


def make(n_rows, d_in, d_out, r, n_slots, dtype, seed=0):
    """x: [N, d_in], A: [n, r, d_in], B: [n, d_out, r], scaling: [n] fp32, y: [N, d_out]; O(1) outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, d_in, generator=g)
    A = torch.randn(n_slots, r, d_in, generator=g) / d_in**0.5
    B = torch.randn(n_slots, d_out, r, generator=g) / r**0.5
    scaling = torch.rand(n_slots, generator=g) + 0.5
    y = torch.randn(n_rows, d_out, generator=g)
    return [t.to(DEVICE, dtype) for t in (x, A, B)] + [scaling.to(DEVICE), y.to(DEVICE, dtype)]


def reference(y, x, A, B, scaling, ids):
    d = torch.float64
    return (y.to(d) + lora_delta_gathered(x.to(d), A.to(d), B.to(d), scaling.to(d), ids)).to(y.dtype)


def test_unavailable_without_triton(monkeypatch):
    monkeypatch.setattr(triton_ops, "triton", None)
    assert not triton_ops.available()
    assert not triton_ops.available("cuda")


CASES = {  # name: (d_in, d_out, r, n_slots, ids)
    "ragged r16": (300, 200, 16, 4, [0, 3, 3, -1, 1, 0, 3, -1, 2]),
    "qwen kv r64": (896, 128, 64, 3, [2, 2, -1, 0, 1]),
    "r64, split tail": (2357, 70, 64, 2, [1, 0, 1]),  # 37 blocks of 64: 19 splits of 2, the last half empty
    "r8 padded to 16": (1000, 33, 8, 3, [2, -1, 0, 0]),
    "r24 padded to 32": (130, 260, 24, 2, [1, 0]),
    "one row": (896, 896, 16, 1, [0]),
    "256 rows": (96, 40, 16, 8, [i * 7 % 9 - 1 for i in range(256)]),
}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_reference(case, dtype):
    d_in, d_out, r, n_slots, ids = CASES[case]
    ids = torch.tensor(ids, device=DEVICE)
    x, A, B, scaling, y = make(len(ids), d_in, d_out, r, n_slots, dtype)
    expected = reference(y, x, A, B, scaling, ids)
    out = triton_ops.lora_apply_(y.clone(), x, A, B, scaling, ids)
    torch.testing.assert_close(out, expected, **TOL[dtype])
    skip = ids < 0
    assert torch.equal(out[skip], y[skip])


FUSED = {  # name: (d_in, module widths, r, ids)
    "qkv r16": (96, (112, 16, 16), 16, [0, 2, -1, 1, 2, 2]),  # GQA widths, bounds inside output tiles
    "gate_up r8": (64, (200, 200), 8, [1, -1, 0]),
    "ragged r24": (130, (33, 70, 5), 24, [2, 1, 0, -1]),
    "qkv r64": (200, (112, 16, 16), 64, [1, -1, 0]),  # 192 rows of A: a [256, 16] tile per step
}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(FUSED))
def test_fused_modules_match_each_module_alone(case, dtype):
    # one launch pair for modules sharing x == each module's own update on its columns
    d_in, widths, r, ids = FUSED[case]
    ids = torch.tensor(ids, device=DEVICE)
    x, A, B, scaling, y = make(len(ids), d_in, sum(widths), r * len(widths), 3, dtype, seed=6)
    B = B[:, :, :r].contiguous()  # [slots, d_out, r]: each column's own module's B
    starts = [sum(widths[:i]) for i in range(len(widths))]
    expected = torch.cat([
        reference(y[:, s:s + w], x, A[:, m * r:(m + 1) * r], B[:, s:s + w], scaling, ids)
        for m, (s, w) in enumerate(zip(starts, widths))
    ], dim=1)
    out = triton_ops.lora_apply_(y.clone(), x, A, B, scaling, ids, bounds=tuple(starts[1:]))
    torch.testing.assert_close(out, expected, **TOL[dtype])
    assert torch.equal(out[ids < 0], y[ids < 0])
    op = y.clone()
    torch.ops.tasktune.bgmv_lora(op, x, A, B, scaling, ids, list(starts[1:]))  # the operator the decoder calls
    assert torch.equal(op, out)


@needs_kernels
@pytest.mark.parametrize("rows, d_in", [(3, 600), (260, 2100)])  # 260 rows: one split of 9 K blocks
def test_delta_with_rmsnorm_folded_into_the_shrink(rows, d_in):
    """`lora_delta` with the RMSNorm folded into its shrink equals the delta of the
    normalised input (x * weight rounded to x's dtype, as the fused linear rounds it)."""
    x, A, B, scaling, _ = make(rows, d_in, 70, 16, 3, torch.float32, seed=7)
    nw = torch.rand(d_in, device=DEVICE) + 0.5
    ids = torch.tensor([2, -1, 0] * (rows // 3) + [1] * (rows % 3), device=DEVICE)
    got = triton_ops.lora_delta(x, A, B, scaling, ids, norm=(nw, 1e-6))
    d = torch.float64
    xn = x.to(d) * torch.rsqrt(x.to(d).pow(2).mean(-1, keepdim=True) + 1e-6) * nw.to(d)
    want = lora_delta_gathered(xn.to(torch.float32).to(d), A.to(d), B.to(d), scaling.to(d), ids)
    torch.testing.assert_close(got.to(d), want, rtol=1e-4, atol=1e-5)
    assert not got[1].any()


@needs_kernels
def test_rejects_bad_bounds():
    x, A, B, scaling, y = make(2, 16, 20, 48, 1, torch.float32)
    ids = torch.zeros(2, dtype=torch.long, device=DEVICE)
    B = B[:, :, :16].contiguous()
    # (rows of A, bounds): 2 modules' rows but no bound; a bound past d_out; one at 0; unsorted; 4 modules
    for rows, bounds in [(32, ()), (32, (25,)), (32, (0,)), (48, (10, 5)), (64, (2, 4, 6))]:
        with pytest.raises(ValueError, match="bounds"):
            triton_ops.lora_apply_(y, x, torch.zeros(1, rows, 16, device=DEVICE), B, scaling, ids, bounds=bounds)


@needs_kernels
def test_in_place_on_row_strided_views():
    # y and x as column slices of wider buffers (row stride != width), as a fused qkv output would be
    x, A, B, scaling, y = make(6, 200, 90, 16, 3, torch.float32, seed=1)
    ids = torch.tensor([1, -1, 2, 2, 0, 1], device=DEVICE)
    y_buf = torch.zeros(6, 128, device=DEVICE)
    x_buf = torch.zeros(6, 256, device=DEVICE)
    y_buf[:, 10:100] = y
    x_buf[:, 50:250] = x
    out = triton_ops.lora_apply_(y_buf[:, 10:100], x_buf[:, 50:250], A, B, scaling, ids)
    assert out.data_ptr() == y_buf[:, 10:100].data_ptr()
    torch.testing.assert_close(y_buf[:, 10:100], reference(y, x, A, B, scaling, ids), **TOL[torch.float32])
    assert not y_buf[:, :10].any() and not y_buf[:, 100:].any()  # nothing written outside the view


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_non_finite_adapter_does_not_leak(dtype):
    x, A, B, scaling, y = make(7, 257, 129, 16, 4, dtype, seed=2)
    A[0, 3, 100] = float("nan")  # slot 0: what -1 rows would read if they read anything
    B[0, 5, 2] = float("inf")
    A[2].fill_(float("inf"))  # slot 2: used by no row
    B[2, :, 0] = float("nan")
    ids = torch.tensor([1, -1, 3, 1, -1, 3, 3], device=DEVICE)
    out = triton_ops.lora_apply_(y.clone(), x, A, B, scaling, ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(y, x, A, B, scaling, ids), **TOL[dtype])
    assert torch.equal(out[ids < 0], y[ids < 0])


@needs_kernels
def test_all_rows_one_adapter_and_no_adapter():
    x, A, B, scaling, y = make(8, 128, 64, 16, 2, torch.float32, seed=3)
    same = torch.full((8,), 1, device=DEVICE)
    torch.testing.assert_close(triton_ops.lora_apply_(y.clone(), x, A, B, scaling, same),
                               reference(y, x, A, B, scaling, same), **TOL[torch.float32])
    none = torch.full((8,), -1, device=DEVICE)
    assert torch.equal(triton_ops.lora_apply_(y.clone(), x, A, B, scaling, none), y)
    empty = y[:0]
    assert triton_ops.lora_apply_(empty, x[:0], A, B, scaling, none[:0]) is empty


@needs_kernels
def test_close_to_the_bf16_torch_path():
    # the path it replaces, in bf16 as the server runs it (that one rounds h and the delta too)
    x, A, B, scaling, y = make(32, 896, 896, 16, 8, torch.bfloat16, seed=4)
    ids = torch.tensor([i % 9 - 1 for i in range(32)], device=DEVICE)
    out = triton_ops.lora_apply_(y.clone(), x, A, B, scaling, ids)
    torch.testing.assert_close(out, y + lora_delta_gathered(x, A, B, scaling, ids), rtol=3e-2, atol=3e-2)


@needs_kernels
def test_rejects_rank_above_limit():
    x, A, B, scaling, y = make(2, 16, 16, 80, 1, torch.float32)
    with pytest.raises(ValueError, match="rank"):
        triton_ops.lora_apply_(y, x, A, B, scaling, torch.zeros(2, dtype=torch.long, device=DEVICE))


@needs_kernels
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="CUDA graphs need a GPU (not the interpreter)")
def test_cuda_graph_replay_with_new_ids():
    x, A, B, scaling, y0 = make(32, 896, 4864, 16, 32, torch.bfloat16, seed=5)
    ids = torch.zeros(32, dtype=torch.long, device=DEVICE)  # the graph's input: rewritten in place
    y = torch.empty_like(y0)

    def step():
        y.copy_(y0)
        triton_ops.lora_apply_(y, x, A, B, scaling, ids)

    side = torch.cuda.Stream()  # warm-up (compiles the kernels) off the capturing stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for new in ([i % 4 for i in range(32)], list(range(31, -1, -1)), [-1 if i % 3 else i for i in range(32)]):
        ids.copy_(torch.tensor(new, device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, reference(y0, x, A, B, scaling, ids), **TOL[torch.bfloat16])
        assert torch.equal(y[ids < 0], y0[ids < 0])


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="CUDA graphs and PDL need a GPU")
def test_chained_pairs_with_pdl_in_a_cuda_graph_equal_eager_launches():
    """Six dependent linears, each a cuBLAS GEMM then the BGMV pair (the expand launched
    while the shrink finishes, programmatic dependent launch), as one CUDA graph: its
    replays equal the same chain run eagerly without PDL, bit for bit."""
    g = torch.Generator().manual_seed(4)
    D, M, layers = 256, 32, 6
    Ws = [(torch.randn(D, D, generator=g) / D**0.5).to(DEVICE, torch.bfloat16) for _ in range(layers)]
    A = (torch.randn(4, 16, D, generator=g) / D**0.5).to(DEVICE, torch.bfloat16)
    B = (torch.randn(4, D, 16, generator=g) * 0.1).to(DEVICE, torch.bfloat16)
    scaling, ids = torch.ones(4, device=DEVICE), (torch.arange(M) % 5 - 1).to(DEVICE)
    x0 = torch.randn(M, D, generator=g).to(DEVICE, torch.bfloat16)

    def chain(x):
        for W in Ws:
            x = triton_ops.lora_apply_(x @ W.T, x, A, B, scaling, ids)
        return x

    assert_graph_with_pdl_equals_eager(chain, x0)
