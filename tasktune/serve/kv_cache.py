"""A preallocated, slot-based KV cache (gpt-fast style): one slot per running sequence.

k, v: [layers, slots, kv_heads, max_len, head_dim], allocated once. A sequence owns one
slot from admission to finish; its token at position p lives at [:, slot, :, p]. Nothing
is allocated per step, so the decode step has static shapes. Paging (vLLM blocks) is a
later step when sequences of very different lengths must share memory.
"""

from __future__ import annotations

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
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    # slot bookkeeping (host side)
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        """A free slot, or None when every slot holds a running sequence."""
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"KV slot {slot} is not allocated")
        self._free.append(slot)

    # device side
    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots, positions: [N]; k, v: [N, kv_heads, head_dim] -> stored at [layer, slot, :, pos]."""
        self.k[layer, slots, :, positions] = k.to(self.k.dtype)
        self.v[layer, slots, :, positions] = v.to(self.v.dtype)

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """slots: [B] -> k, v: [B, kv_heads, length, head_dim] (positions 0..length-1)."""
        k = self.k[layer].index_select(0, slots)[:, :, :length]
        v = self.v[layer].index_select(0, slots)[:, :, :length]
        return k, v
