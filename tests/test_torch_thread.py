"""TorchThread: calls run on its one thread, in order, with results and errors carried back."""

from __future__ import annotations

import threading

import pytest

from tasktune.serve.torch_thread import TorchThread


def test_calls_run_on_the_one_thread_in_order():
    seen: list[tuple[str, int]] = []
    t = TorchThread("one-torch-thread")
    callers = [threading.Thread(target=lambda i=i: t.call(lambda: seen.append((threading.current_thread().name, i))))
               for i in range(8)]
    for c in callers:
        c.start()
    for c in callers:
        c.join()
    assert sorted(i for _, i in seen) == list(range(8)) and {n for n, _ in seen} == {"one-torch-thread"}
    assert t.call(lambda: t.call(lambda: 41) + 1) == 42  # a call from the thread itself runs in place
    with pytest.raises(ZeroDivisionError):
        t.call(lambda: 1 / 0)
    assert t.call(lambda: "still serving") == "still serving"
    t.close()
    with pytest.raises(RuntimeError, match="closed"):
        t.call(lambda: 1)


def test_the_loop_gives_work_when_no_call_waits():
    pending, done = [1, 2, 3], []
    t = TorchThread("looping", lambda: (lambda: done.append(pending.pop(0))) if pending else None)
    assert t.call(lambda: "after the loop's work") == "after the loop's work"
    pending.append(4)
    t.wake()
    t.call(lambda: None)  # calls come first: the loop may still hold the 4
    t.close()
    t._thread.join(timeout=10)
    assert done == [1, 2, 3, 4] and not t._thread.is_alive()
