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
    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of one layer: views [slots, kv_heads, max_len, head_dim]; the decoder writes
        token t of slot s at [s, :, position] and reads the slots' first positions."""
        return self.k[layer], self.v[layer]
