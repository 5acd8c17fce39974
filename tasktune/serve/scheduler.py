"""Continuous batching: which sequences run this step.

The scheduler knows sequences only as token ids, an adapter id and sampling parameters;
it does not know what a task or a tokenizer is (vLLM's lesson). Each step it admits
waiting sequences in arrival order while a KV slot is free, the prefill token budget
allows and the `reserve` hook (the engine pinning the adapter on the device) succeeds;
everything already running decodes one token. Finished sequences give their slot back
at once, so requests join and leave every step.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from tasktune.errors import TasktuneError
from tasktune.serve.sampling import SamplingParams, TokenLogprob

_ids = itertools.count()


class QueueFull(TasktuneError):
    """The waiting queue is at capacity; the client should retry later (HTTP 429)."""


@dataclass(eq=False)
class Sequence:
    """One request's state. Equal only to itself (identity hashing): the engine's membership
    tests once compared every field, prompts and outputs included, which cost the step in
    which a batch of 32 finished ~1 ms of host time. `text` of a finished request that was
    not streamed is decoded when first read (`text_later`), not in the engine's step: the
    step that finished a batch of 32 spent ~4 ms of an H200 host's time decoding them while
    the GPU idled (session 12)."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # adapter name; None = base model
    request_id: str = field(default_factory=lambda: f"seq-{next(_ids)}")
    lora_id: int = -1  # slot in the adapter pool's stacked weights while running
    kv_slot: int = -1
    output_ids: list[int] = field(default_factory=list)
    _text: str = ""
    _text_later: Callable[[], str] | None = field(default=None, repr=False)
    prefix_offset: int = 0  # incremental detokenisation window over output_ids (detokenize.detokenize_step)
    read_offset: int = 0
    decode_stream: object | None = field(default=None, repr=False)  # ... or the tokenizers library's DecodeStream
    sent: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    on_update: Callable[["Sequence"], None] | None = None
    stream: bool = False  # text and on_update every token (else once, when finished)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, if params.logprobs is set
    logprobs_sent: int = 0  # of `logprobs`, streamed already
    # one per prompt token if params.prompt_logprobs is set (the first None: nothing precedes it)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # continuations scored after the prompt in one prefill (branch_scoring.py), and each one's
    # tokens' log-probabilities once scored
    branches: list[list[int]] | None = None
    matcher: object | None = field(default=None, repr=False)  # its grammar's matcher, if params.grammar (grammar.py)
    branch_logprobs: list[list[float]] | None = None

    @property
    def text(self) -> str:
        if self._text_later is not None:  # (decoding twice from two threads is harmless: one result)
            self._text, self._text_later = self._text_later(), None
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._text, self._text_later = value, None

    def text_later(self, decode: Callable[[], str]) -> None:
        """The text is decode()'s, computed at its first read."""
        self._text_later = decode

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_tokens(self) -> int:
        """The tokens its prefill runs: the prompt and any branches."""
        return len(self.prompt_ids) + sum(map(len, self.branches or ()))


class Scheduler:
    def __init__(self, max_running: int, max_waiting: int, max_prefill_tokens: int = 4096):
        self.max_running, self.max_waiting = max_running, max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def can_accept(self) -> bool:
        return len(self.waiting) < self.max_waiting

    def add(self, seq: Sequence) -> None:
        if not self.can_accept():
            raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests); retry later")
        self.waiting.append(seq)

    def admit(self, reserve: Callable[[Sequence], bool]) -> list[Sequence]:
        """Move waiting sequences into running (FIFO) and return them for prefill.

        `reserve(seq)` assigns the KV slot and adapter id and returns False when the
        resources are not there now; admission stops at the first such sequence so that
        no request starves behind later arrivals."""
        admitted, budget = [], self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                seq.finish_reason = "cancelled"
                admitted.append(seq)
                continue
            if admitted and seq.prefill_tokens > budget:
                break
            if not reserve(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            admitted.append(seq)
            budget -= seq.prefill_tokens
        return admitted

    def retire(self) -> list[Sequence]:
        """Drop finished sequences from running; the caller frees their resources."""
        done = [s for s in self.running if s.finished]
        self.running = [s for s in self.running if not s.finished]
        return done
