"""What the decode step keeps about a step launched ahead of its inputs' confirmation
(`cuda_graphs.DecodeStep.greedy`), and about the rows a prefill adds to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class JoiningRows:
    """Rows prefilled in this engine step that join the next step launched ahead (`DecodeStep.join`)."""

    slots: list[int]
    tokens: torch.Tensor  # their first tokens, on the device
    positions: list[int]
    lora_ids: list[int]
    read: Callable[[], list[int]]  # their first tokens as a list
    logprobs: int | None = None
    bound: bool = False  # some of them are bound to a grammar
    sampled: tuple[int, ...] = ()  # the slots of those that sample


@dataclass
class AheadStep:
    """A step launched before its inputs were confirmed (`DecodeStep.greedy`)."""

    slots: list[int]
    lora_ids: list[int]
    positions: list[int]
    gens: list[int]  # each slot's generation at launch (DecodeStep.release)
    host: torch.Tensor | None  # where its tokens land (by slot)
    done: torch.cuda.Event | None
    lp_host: torch.Tensor | None = None  # where its logprob_table lands (by slot), if it made one
    lp_k: int | None = None  # ... with this many alternatives a row
    tokens: list[int] | None = None  # the tokens it was fed, known once the previous step is read
    # (logits, argmax) of a step with rows bound to grammars: their tokens wait for the masks
    # filled after the previous step's tokens are read (host copies made then, `greedy`)
    outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    def matches(self, slots, tokens, positions, lora_ids, gens) -> bool:
        """Every row asked for was one of its rows, fed the same (rows that joined from a
        prefill come after the others; a row it has beyond those asked for is a sequence
        that finished since: its result is not read, its KV write went to a slot that a new
        sequence rewrites before reading, `DecodeStep.greedy`)."""
        if self.tokens is None or len(self.tokens) != len(self.slots):
            return False
        mine = {s: row for s, *row in zip(self.slots, self.tokens, self.positions, self.lora_ids, self.gens)}
        return all(mine.get(s) == [t, p, a, g] for s, t, p, a, g in zip(slots, tokens, positions, lora_ids, gens))
