"""A preallocated, slot-based KV cache (gpt-fast style): one slot per running sequence.

k, v: [layers, slots, kv_heads, max_len, head_dim], allocated once. A sequence owns one
slot from admission to finish; its token at position p lives at [:, slot, :, p]. Nothing
is allocated per step, so the decode step has static shapes. Free slots are handed out
lowest first, so B running sequences tend to occupy slots 0..B-1 and the decode step
(row b = slot b) covers few padding rows. Paging (vLLM blocks) is a later step when
sequences of very different lengths must share memory.
"""

from __future__ import annotations

import heapq

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_len = num_slots, max_len
        self._free = list(range(num_slots))  # a heap: the lowest free slot first

    # slot bookkeeping (host side)
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        """A free slot, or None when every slot holds a running sequence."""
        return heapq.heappop(self._free) if self._free else None

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"KV slot {slot} is not allocated")
        heapq.heappush(self._free, slot)

    # device side
    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots, positions: [N]; k, v: [N, kv_heads, head_dim] -> stored at [layer, slot, :, pos]."""
        self.k[layer, slots, :, positions] = k.to(self.k.dtype)
        self.v[layer, slots, :, positions] = v.to(self.v.dtype)

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """slots: [B] -> k, v: [B, kv_heads, length, head_dim] (positions 0..length-1)."""
        k = self.k[layer, :, :, :length].index_select(0, slots)
        v = self.v[layer, :, :, :length].index_select(0, slots)
        return k, v

    def first(self, layer: int, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of slots 0..count-1, positions 0..length-1: [count, kv_heads, length, head_dim]."""
        return self.k[layer, :count, :, :length], self.v[layer, :count, :, :length]
