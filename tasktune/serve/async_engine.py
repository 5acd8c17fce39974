"""The engine's steps in a background thread, their results handed to asyncio code (the HTTP API).

`Engine.step` is synchronous and holds the GPU's attention for a step; the API's event
loop must not block on it. `AsyncEngine` runs steps in one thread while there is work and
turns each sequence's updates into events on an asyncio queue: streamed text as it can no
longer change (`take_delta`), and the finish reason last.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import AsyncIterator

from tasktune.serve.engine import Completion, Engine, Request, completion_of
from tasktune.serve.sampling import TokenLogprob
from tasktune.serve.scheduler import Sequence
from tasktune.serve.torch_thread import TorchThread

log = logging.getLogger(__name__)


def take_delta(seq: Sequence) -> str:
    """The text not yet streamed that can no longer change: holds back a possible start of
    a stop string and an incomplete UTF-8 character until the sequence finishes."""
    end = len(seq.text)
    if not seq.finished:
        hold = max((len(s) for s in seq.params.stop), default=1) - 1
        end = max(seq.sent, end - hold)
        while end > seq.sent and seq.text[end - 1] == "\ufffd":
            end -= 1
    delta, seq.sent = seq.text[seq.sent:end], max(seq.sent, end)
    return delta


def take_logprobs(seq: Sequence) -> list[TokenLogprob]:
    """The log-probabilities of the tokens generated since the last call (a streamed request
    that asked for them): they go out with the text of the same update, which may hold back
    some of those tokens' text (take_delta)."""
    new = seq.logprobs[seq.logprobs_sent:]
    seq.logprobs_sent += len(new)
    return new


@dataclass
class Event:
    """One update: new text (streamed requests; else empty, the text is seq.text), the new
    tokens' log-probabilities (streamed requests that asked), and the finish reason on the
    last one."""

    text: str
    finish_reason: str | None
    seq: Sequence
    logprobs: list[TokenLogprob] = field(default_factory=list)


class AsyncEngine:
    """Runs `Engine.step` in a background thread while there is work; coroutines await results."""

    def __init__(self, engine: Engine, torch_thread: TorchThread | None = None):
        """torch_thread: the thread that loaded the engine's model, to step it on (a CPU's
        torch ops run 2x slower from a second thread: torch_thread.py); else one of its own."""
        self.engine = engine
        self._wake, self._stop, self._paused = threading.Event(), False, False
        self._given, self._own = torch_thread, None
        self._loop: Future | None = None  # the step loop, running on the thread

    def start(self) -> None:
        if self._loop is None or self._loop.done():
            self._stop = False
            if self._given is None and self._own is None:
                self._own = TorchThread("tasktune-engine")
            self._loop = (self._given or self._own).submit(self._run)

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._loop is not None:
            wait([self._loop], timeout=10)
        self._loop = None
        if self._own is not None:
            self._own.close()
            self._own = None

    def pause(self) -> None:
        """Hold the loop between steps (tests, maintenance); queued requests wait."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            self._wake.clear()
            if self._paused or not self.engine.has_work:
                self._wake.wait(0.1)
                continue
            try:
                self.engine.step()
            except Exception as e:  # keep serving; fail the affected requests
                log.exception("engine step failed")
                self.engine.abort_all(f"internal engine error: {type(e).__name__}")

    def submit(self, request: Request) -> tuple[Sequence, asyncio.Queue]:
        """Queue a request (errors raise here, before any response starts); events arrive on the queue."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def on_update(seq: Sequence) -> None:  # (runs in the engine's thread: a request not streamed
            # gets one event, at its end, and its reader takes seq.text, decoded there: Sequence.text)
            if seq.stream:
                ev = Event(take_delta(seq), seq.finish_reason, seq, take_logprobs(seq))
            else:
                ev = Event("", seq.finish_reason, seq)
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        self.start()
        seq = self.engine.submit(request, on_update)
        self._wake.set()
        return seq, queue

    async def stream(self, seq: Sequence, queue: asyncio.Queue) -> AsyncIterator[Event]:
        try:
            while True:
                ev = await queue.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                self.engine.cancel(seq)
                self._wake.set()

    async def complete(self, request: Request) -> Completion:
        seq, queue = self.submit(request)
        async for _ in self.stream(seq, queue):
            pass
        return completion_of(seq)
