"""The served decoder's adapters: the pool's stacked weights and each adapted linear's delta.

`LoraStacks` holds every resident adapter's A and B per (layer, module), stacked by slot
(the adapter pool writes them in place); `add_lora_` / `kernel_lora_` add each row's delta
to a linear's output: on a GPU through the Triton launch pairs (BGMV for a decode step,
segmented for a padded prefill graph), else through the torch paths of lora/ops.py chosen
by the batch's layout. decoder.py's blocks call these for every adapted linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tasktune.lora import triton_ops  # noqa: F401  (registers torch.ops.tasktune.bgmv_lora)
from tasktune.lora import triton_sgmv  # (registers torch.ops.tasktune.sgmv_lora)
from tasktune.lora.ops import gather_rows, lora_delta, lora_delta_masked, lora_delta_rows
from tasktune.serve.forward_batch import Batch

# A padded prefill in a CUDA graph (prefill_graphs.py) takes LoRA through the segmented pair
# (triton_sgmv) where its rows tile (False: the BGMV pair, as session 14's graphs did; the
# serve bench's staggered case times both)
PREFILL_SGMV = True


def takes_kernels(batch: Batch, lora: LoraStacks) -> bool:
    """Whether this forward's adapted linears take the Triton kernels (`kernel_lora_`): a
    decode step, or a prefill that a CUDA graph captures (prefill_graphs.py), which must
    read the adapter ids from the device. (An eager prefill's torch paths cost the host less: one
    256-token request with an adapter, H200, 46.5 ms a step against 52.1 through the pair.)"""
    return lora.kernels and (batch.decode or batch.bgmv)


@dataclass
class LoraStacks:
    """The pool's stacked adapter weights, read by every adapted linear.

    weights: (layer, module) -> (A [slots, r, d_in], B [slots, d_out, r]); scaling: [slots].
    fused: (layer, fused linear) -> (A, B) of all its modules at once, whose per-module
    views `weights` holds (adapter_pool.stack_storage); the Triton path reads these.
    The pool updates these tensors in place, so the decoder keeps one reference."""

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    fused: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scaling: torch.Tensor | None = None
    kernels: bool = False  # decode with the Triton kernels (lora/triton_ops.py) instead of torch
    # ... and with the fused linears (Decoder.linear_kernel), LoRA inside their launches too
    # (triton_linear: the shrink and expand per distinct adapter, no launch of their own)
    # instead of the BGMV pair's delta added in their epilogue. Off: slower in the decode
    # step on an H200 (session 7: 17,199 vs 18,530 tok/s at 4 adapters, 15,124 vs 17,699
    # at 32, against cuBLAS + the pair; bench/README.md). (Session 8: only the expand inside
    # them, each row's h from a shrink launch before: 13,473 / 11,294 against the pair's
    # delta at 19,146 / 18,282 in the same run; removed.)
    fused_linears: bool = False
    # ... or only in a step of at most triton_lora_few.FEW distinct adapters, as triton_lora_few.py
    # says (DecodeStep's FEW_LORA graphs). Off: in the serve bench's decode step (H200, session
    # 25) 26,323 tok/s at 4 adapters against 26,531 through the BGMV pair in the same run,
    # though the layers bench had it 1-4 us a layer ahead (bench/README.md "LoRA of a few adapters")
    few_linears: bool = False
    _layers: dict = field(default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        """The stacks' rank (the pool's max rank; smaller adapters are zero-padded)."""
        return next(iter(self.weights.values()))[0].shape[1]

    def layer(self, index: int) -> "LayerLora":
        """One layer's stacks, keyed by module name (built once: the tensors never change)."""
        if index not in self._layers:
            pick = lambda d: {m: ab for (i, m), ab in d.items() if i == index}  # noqa: E731
            self._layers[index] = LayerLora(pick(self.weights), pick(self.fused))
        return self._layers[index]


@dataclass(frozen=True)
class LayerLora:
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    fused: dict[str, tuple[torch.Tensor, torch.Tensor]]


def kernel_lora_(y: torch.Tensor, x: torch.Tensor, ab: tuple[torch.Tensor, torch.Tensor], lora: LoraStacks,
                 batch: Batch, bounds: list[int]) -> None:
    """y += each row's adapter delta through the Triton kernels, in place: a padded prefill
    whose sequences tile into 16-row blocks takes the segmented pair (each adapter's weights
    read once a row tile: triton_sgmv), anything else the BGMV pair (once a row)."""
    A, B = ab[0].contiguous(), ab[1]
    T = batch.shape[1]
    if PREFILL_SGMV and batch.seg_ids is not None and triton_sgmv.block_m(T):
        torch.ops.tasktune.sgmv_lora(y, x, A, B, lora.scaling, batch.seg_ids, T, bounds)
    else:
        torch.ops.tasktune.bgmv_lora(y, x, A, B, lora.scaling, batch.lora_ids, bounds)


def add_lora_(y: torch.Tensor, x: torch.Tensor, ab: tuple[torch.Tensor, torch.Tensor], lora: LoraStacks,
              batch: Batch) -> None:
    """y += each row's adapter delta, in place; y may be a column slice of a fused output."""
    if takes_kernels(batch, lora):  # Triton: each row (or row tile of a padded prefill) reads its adapter in place
        kernel_lora_(y, x, ab, lora, batch, [])
    elif batch.decode:  # no host sync: the decode step may be a CUDA graph
        rows = batch.lora_rows or gather_rows(batch.lora_ids, lora.scaling)
        y.add_(lora_delta_rows(x, ab[0], ab[1], *rows).to(y.dtype))
    elif batch.lora_mask is not None:  # prefill, several adapters: a few dense ops over the batch's adapters
        A, B, scale = (t.index_select(0, batch.active) for t in (ab[0], ab[1], lora.scaling))
        y.add_(lora_delta_masked(x, A, B, scale, batch.active_ids, batch.lora_mask).to(y.dtype))
    else:
        y.add_(lora_delta(x, ab[0], ab[1], lora.scaling, batch.lora_ids, batch.plan).to(y.dtype))
