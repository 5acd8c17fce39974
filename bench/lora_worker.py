"""A persistent LoRA worker beside the decode chain: an experiment on issue 5's 4-adapter target.

The decoder's default path puts each linear's LoRA on the critical path as two launches (the
BGMV shrink and expand, ~1.9 us a dependent hop with PDL, ~15 us a layer at 4 adapters
where 0.9x of the no-adapter step allows ~4). Here one kernel of W programs, launched on a
second stream at the start of the chain, does every linear's LoRA in decode order: it polls
a counter each fused linear bumps as it stores an N block of its output (`decode_linear(...,
signal=)`), computes the shrink of that output over K parts (the batch's up to U distinct
adapters, a tensor-core product each, fp32 atomics into h), meets its other programs at a
counter, expands its share of the output columns and counts itself done. The consuming
fused linear runs its GEMM as soon as its input is there (no launches between it and its
producer) and polls the done count only in its epilogue (`wait_delta=`). So the LoRA pays
counter polls instead of launches, and runs beside the GEMM it feeds.

GPU only (the programs must run at once: the interpreter runs them one after another).
Used by `decode_layers_bench.py --worker`; not the decoder's path.
"""
from __future__ import annotations

import torch

from tasktune.lora.triton_ops import triton
from tasktune.serve.triton_linear import decode_linear, linear_config

if triton is not None:
    import triton.language as tl

    from tasktune.serve.triton_linear_blocks import (arrive, distinct_adapters, dot_acc, load_act, nth_adapter,
                                                      wait_count)
    from tasktune.serve.triton_lora_rows import prefetch_l2

    @triton.jit
    def _job(x_ptr, stride_xm, nw_ptr, a_ptr, b_ptr, h_ptr, d_ptr, cnt_ptr, ready, ready_for, bar, done,
             ids_v, first, order, row_scale, offs_m, m_ok, pid, bound1, bound2,
             K: tl.constexpr, ROWS: tl.constexpr, MODULES: tl.constexpr, R: tl.constexpr, NORM: tl.constexpr,
             W: tl.constexpr, BLOCK_M: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, U: tl.constexpr,
             RA_PAD: tl.constexpr, PREFETCH: tl.constexpr, INTERPRETED: tl.constexpr):
        """One linear's LoRA delta: d[M, ROWS] = scale * B[slot] @ (A[slot] @ act(x)), fp32
        (act: x times the norm weight, without the 1 / rms, which the linear applies)."""
        offs_ra = tl.arange(0, RA_PAD)
        ra_ok = offs_ra < MODULES * R
        offs_k = tl.arange(0, BK)
        NKB: tl.constexpr = (K + BK - 1) // BK
        NT: tl.constexpr = (ROWS + BN - 1) // BN
        jj = offs_ra % R
        mod_of = offs_ra // R
        if PREFETCH:  # this program's A rows and B tiles, before the poll
            for u in tl.static_range(U):
                slot = nth_adapter(ids_v, first, order, u)
                for i in range(0, (NKB + W - 1) // W):
                    kb = pid + i * W
                    prefetch_l2(a_ptr + tl.maximum(slot, 0).to(tl.int64) * (MODULES * R * K) + offs_ra * K + kb * BK,
                                ra_ok & (slot >= 0) & (kb < NKB), INTERPRETED)
                for i in range(0, (NT + W - 1) // W):
                    rows_n = (pid + i * W) * BN + tl.arange(0, BN // 4) * 4  # 4 rows of 16 ranks: a 128-byte line
                    prefetch_l2(b_ptr + tl.maximum(slot, 0).to(tl.int64) * (ROWS * R) + rows_n * R,
                                (rows_n < ROWS) & (slot >= 0), INTERPRETED)
        wait_count(cnt_ptr + ready, ready_for, INTERPRETED)
        h = tl.zeros((RA_PAD, BLOCK_M), dtype=tl.float32)
        for i in range(0, (NKB + W - 1) // W):  # shrink: this program's K blocks (pid, pid + W, ...)
            k = (pid + i * W) * BK + offs_k
            k_ok = k < K
            xa, _ = load_act(x_ptr, nw_ptr, offs_m, k, m_ok, k_ok, stride_xm, NORM)
            for u in tl.static_range(U):
                slot = nth_adapter(ids_v, first, order, u)
                if slot >= 0:
                    a = tl.load(a_ptr + slot.to(tl.int64) * (MODULES * R * K) + offs_ra[:, None] * K + k[None, :],
                                mask=ra_ok[:, None] & k_ok[None, :], other=0.0)
                    p = dot_acc(a, xa, tl.zeros((RA_PAD, BLOCK_M), dtype=tl.float32), INTERPRETED)
                    h += tl.where((ids_v == slot)[None, :], p, 0.0)
        if pid < NKB:
            tl.atomic_add(h_ptr + offs_m[None, :] * RA_PAD + offs_ra[:, None], h, mask=ra_ok[:, None] & m_ok[None, :],
                          sem="relaxed")
        arrive(cnt_ptr + bar, pid, INTERPRETED)
        wait_count(cnt_ptr + bar, W, INTERPRETED)
        hrow = tl.load(h_ptr + offs_m[None, :] * RA_PAD + offs_ra[:, None], mask=ra_ok[:, None] & m_ok[None, :],
                       other=0.0, cache_modifier=".cg") * row_scale[None, :]
        for i in range(0, (NT + W - 1) // W):  # expand: this program's column tiles (pid, pid + W, ...)
            offs_n = (pid + i * W) * BN + tl.arange(0, BN)
            n_ok = offs_n < ROWS
            module = (offs_n >= bound1).to(tl.int32) + (offs_n >= bound2).to(tl.int32)
            acc = tl.zeros((BN, BLOCK_M), dtype=tl.float32)
            for u in tl.static_range(U):
                slot = nth_adapter(ids_v, first, order, u)
                if slot >= 0:
                    b = tl.load(b_ptr + slot.to(tl.int64) * (ROWS * R) + offs_n[:, None] * R + jj[None, :],
                                mask=(module[:, None] == mod_of[None, :]) & ra_ok[None, :] & n_ok[:, None], other=0.0)
                    hu = tl.where((ids_v == slot)[None, :], hrow, 0.0).to(b.dtype)
                    acc = dot_acc(b, tl.trans(hu), acc, INTERPRETED)
            tl.store(d_ptr + offs_m[None, :] * ROWS + offs_n[:, None], acc, mask=m_ok[None, :] & n_ok[:, None])
        arrive(cnt_ptr + done, pid, INTERPRETED)

    @triton.jit
    def _lora_worker(qkv_ptr, mid_ptr, act_ptr, nw1_ptr, nw2_ptr, aq, bq, ao, bo, ag, bg, ad, bd,
                     scale_ptr, ids_ptr, h_ptr, dq_ptr, do_ptr, dg_ptr, dd_ptr, cnt_ptr, M, L,
                     n_qkv, n_o, n_gu, n_down,
                     D: tl.constexpr, Q: tl.constexpr, QKV: tl.constexpr, I: tl.constexpr, R: tl.constexpr,
                     SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, W: tl.constexpr, BK: tl.constexpr,
                     BN: tl.constexpr, U: tl.constexpr, PREFETCH: tl.constexpr, INTERPRETED: tl.constexpr):
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        ids_v, first, order = distinct_adapters(ids_ptr, offs_m, M)
        row_scale = tl.load(scale_ptr + tl.maximum(ids_v, 0), mask=ids_v >= 0, other=0.0).to(tl.float32)
        J = L * 4
        HS: tl.constexpr = BLOCK_M * 64
        for layer in range(L):
            j = layer * 4
            lw = (pid * 0 + layer).to(tl.int64)  # (the interpreter gives the loop an int)
            xq = mid_ptr + 2 * lw * M * D  # x0, or the previous layer's down output
            ready = tl.maximum(j - 1, 0)
            ready_for = tl.where(layer == 0, 0, n_down)
            _job(xq, D, nw1_ptr + lw * D, aq + lw * (SLOTS * 3 * R * D), bq + lw * (SLOTS * QKV * R),
                 h_ptr + j * HS, dq_ptr + lw * M * QKV, cnt_ptr, ready, ready_for, J + j, 2 * J + j,
                 ids_v, first, order, row_scale, offs_m, m_ok, pid, Q, Q + (QKV - Q) // 2,
                 D, QKV, 3, R, True, W, BLOCK_M, BK, BN, U, 64, PREFETCH, INTERPRETED)
            _job(qkv_ptr + lw * M * QKV, QKV, nw1_ptr, ao + lw * (SLOTS * R * Q), bo + lw * (SLOTS * D * R),
                 h_ptr + (j + 1) * HS, do_ptr + lw * M * D, cnt_ptr, j, n_qkv, J + j + 1, 2 * J + j + 1,
                 ids_v, first, order, row_scale, offs_m, m_ok, pid, D, D,
                 Q, D, 1, R, False, W, BLOCK_M, BK, BN, U, 16, PREFETCH, INTERPRETED)
            _job(mid_ptr + (2 * lw + 1) * M * D, D, nw2_ptr + lw * D, ag + lw * (SLOTS * 2 * R * D),
                 bg + lw * (SLOTS * 2 * I * R), h_ptr + (j + 2) * HS, dg_ptr + lw * M * 2 * I, cnt_ptr, j + 1, n_o,
                 J + j + 2, 2 * J + j + 2, ids_v, first, order, row_scale, offs_m, m_ok, pid, I, 2 * I,
                 D, 2 * I, 2, R, True, W, BLOCK_M, BK, BN, U, 32, PREFETCH, INTERPRETED)
            _job(act_ptr + lw * M * I, I, nw1_ptr, ad + lw * (SLOTS * R * I), bd + lw * (SLOTS * D * R),
                 h_ptr + (j + 3) * HS, dd_ptr + lw * M * D, cnt_ptr, j + 2, n_gu, J + j + 3, 2 * J + j + 3,
                 ids_v, first, order, row_scale, offs_m, m_ok, pid, D, D,
                 I, D, 1, R, False, W, BLOCK_M, BK, BN, U, 16, PREFETCH, INTERPRETED)


class WorkerChain:
    """Buffers and launches of the worker path for `layers` layers of the bench's shapes:
    activations as [layers, M, width] (mid: x0, then o's and down's outputs a layer), the
    stacked LoRA weights, fp32 deltas, h accumulators and counters (ready, meet, done per
    linear), zeroed at the start of each chain."""

    def __init__(self, x0, layers: int, D: int, Q: int, KV: int, I: int, r: int, AB: list[dict], scaling, norms,
                 programs: int = 16, max_adapters: int = 4, prefetch: bool = False):
        M, device, dtype = x0.shape[0], x0.device, x0.dtype
        self.L, self.M, self.D, self.Q, self.QKV, self.I, self.r = layers, M, D, Q, Q + 2 * KV, I, r
        self.W, self.U, self.prefetch = programs, max_adapters, prefetch
        self.slots = AB[0]["qkv"][0].shape[0]
        self.stacks = {n: (torch.stack([ab[n][0] for ab in AB]).contiguous(), torch.stack([ab[n][1] for ab in AB])
                           .contiguous()) for n in ("qkv", "o", "gate_up", "down")}
        self.scaling = scaling
        e = dict(device=device)
        self.qkv = torch.empty(layers, M, self.QKV, dtype=dtype, **e)
        self.mid = torch.empty(2 * layers + 1, M, D, dtype=dtype, **e)
        self.mid[0].copy_(x0)
        self.nw1 = torch.stack([n[0] for n in norms])
        self.nw2 = torch.stack([n[1] for n in norms])
        self.act = torch.empty(layers, M, I, dtype=dtype, **e)
        self.d = {"qkv": torch.empty(layers, M, self.QKV, dtype=torch.float32, **e),
                  "o": torch.empty(layers, M, D, dtype=torch.float32, **e),
                  "gate_up": torch.empty(layers, M, 2 * I, dtype=torch.float32, **e),
                  "down": torch.empty(layers, M, D, dtype=torch.float32, **e)}
        self.block_m = max(16, 1 << (M - 1).bit_length())
        self.h = torch.zeros(layers * 4 * self.block_m * 64, dtype=torch.float32, **e)
        self.cnt = torch.zeros(3 * layers * 4, dtype=torch.int32, **e)
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.norms = norms
        # the N blocks each linear stores (its signal count): decode_linear's own configuration
        width = {"qkv": self.QKV, "o": D, "gate_up": I, "down": D}
        k = {"qkv": D, "o": Q, "gate_up": D, "down": I}
        self.n_blocks = {n: -(-width[n] // linear_config(M, width[n], k[n]).BLOCK_N) for n in width}

    def alone(self, ids) -> None:
        """The worker by itself, every input counted ready: its own time for the chain's LoRA."""
        self.h.zero_()
        self.cnt.zero_()
        self.cnt[:self.L * 4].fill_(1 << 20)
        self._launch(ids)

    def _launch(self, ids) -> None:
        s, n_blocks = self.stacks, self.n_blocks
        _lora_worker[(self.W,)](
            self.qkv, self.mid, self.act, self.nw1, self.nw2, *s["qkv"], *s["o"], *s["gate_up"], *s["down"],
            self.scaling, ids, self.h, self.d["qkv"], self.d["o"], self.d["gate_up"], self.d["down"], self.cnt,
            self.M, self.L, n_blocks["qkv"], n_blocks["o"], n_blocks["gate_up"], n_blocks["down"],
            D=self.D, Q=self.Q, QKV=self.QKV, I=self.I, R=self.r, SLOTS=self.slots, BLOCK_M=self.block_m, W=self.W,
            BK=64, BN=64, U=self.U, PREFETCH=self.prefetch, INTERPRETED=self.qkv.device.type != "cuda", num_warps=4)

    def run(self, W, bias, ids, wait: bool = True, load: bool = False) -> torch.Tensor:
        """The chain: zero the scratch, fork the worker, the fused linears in order, join.
        wait False: the linears do not wait for the deltas (wrong sums: what the worker's
        programs cost the chain beside it). load True: every counter starts full, so nothing
        waits (wrong sums): the run that must come first, since CUDA loads a kernel at its first
        launch (lazy loading) and may wait for the device to go idle to do so, which it never
        does while the worker polls for a linear whose launch is the one being loaded."""
        L, J, Q, norms = self.L, self.L * 4, self.Q, self.norms
        self.h.zero_()
        self.cnt.zero_()
        if load:
            self.cnt.fill_(1 << 20)
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            self._launch(ids)
        c = self.cnt
        x = self.mid[0]
        for i in range(L):
            j = i * 4
            kw = lambda n, k: dict(delta=self.d[n][i], delta_rms=False, signal=c[j + k:j + k + 1],  # noqa: E731
                                   wait_delta=(c[2 * J + j + k:2 * J + j + k + 1], self.W if wait else 0))
            decode_linear(x, W[i]["qkv"], bias[i], norm=(norms[i][0], 1e-6), bounds=(Q, Q + (self.QKV - Q) // 2),
                          out=self.qkv[i], **kw("qkv", 0))
            decode_linear(self.qkv[i][:, :Q], W[i]["o"], residual=x, out=self.mid[2 * i + 1], **kw("o", 1))
            decode_linear(self.mid[2 * i + 1], W[i]["gate_up"], norm=(norms[i][1], 1e-6), swiglu=True,
                          bounds=(self.I,), out=self.act[i], **kw("gate_up", 2))
            x = decode_linear(self.act[i], W[i]["down"], residual=self.mid[2 * i + 1], out=self.mid[2 * i + 2],
                              **kw("down", 3))
        main.wait_stream(self.side)
        return x
