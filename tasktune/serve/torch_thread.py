"""One thread for all of a CPU model's torch work.

PyTorch's CPU build parallelises an op over an OpenMP team that belongs to the thread
calling it. Two threads that both run parallel ops keep two teams spinning on the same
cores (pytorch/pytorch#37259): on a 2-core VM a MiniLM forward took 21 ms from the one
thread that had loaded the model and 56-61 ms from either thread once a second one had
run ops too; the HTTP server's worker threads each became such a second thread. So a
server loads its model and runs every forward on one `TorchThread`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


class TorchThread:
    """A daemon thread running submitted calls in order. `loop` (optional) is asked for
    work whenever no call is waiting: it returns a callable to run, or None to sleep until
    `wake`."""

    def __init__(self, name: str, loop: Callable[[], Callable[[], None] | None] | None = None):
        self._loop = loop
        self._calls: list[tuple[Callable[[], object], Future]] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the thread and return its result (or raise its exception); on the
        thread itself, run it in place."""
        if threading.current_thread() is self._thread:
            return fn()
        return self.submit(fn).result()

    def submit(self, fn: Callable[[], T]) -> Future:
        """Queue fn for the thread without waiting: its Future holds the result."""
        done: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError(f"{self._thread.name} is closed")
            self._calls.append((fn, done))
            self._cv.notify()
        return done

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _next(self) -> Callable[[], None] | None:
        """The next piece of work, waiting for one; None once closed."""
        with self._cv:
            while True:
                if self._calls:
                    fn, done = self._calls.pop(0)
                    return lambda: _settle(done, fn)
                work = self._loop() if self._loop is not None else None
                if work is not None:
                    return work
                if self._closed:
                    return None
                self._cv.wait()

    def _run(self) -> None:
        while (work := self._next()) is not None:
            work()


def _settle(done: Future, fn: Callable[[], object]) -> None:
    try:
        done.set_result(fn())
    except BaseException as e:  # the caller raises it
        done.set_exception(e)
