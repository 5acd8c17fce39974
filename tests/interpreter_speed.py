"""Triton's interpreter (the CPU tests' way to run the kernels) re-patches triton.language
on every call of a nested @triton.jit function: two `inspect.getmembers` scans of the
language modules a call, about half the time of the sampling kernels' tests (triton 3.9).
What is patched depends only on the function's module (the language modules its globals
hold), and a launch's patches last until it ends, so a nested call inside a launch can
skip modules already patched in it. `install` wraps the interpreter to do so; with another
interpreter layout it changes nothing.
"""
from __future__ import annotations

import threading


class _NoScope:
    def restore(self) -> None:
        pass


def install() -> bool:
    """Patch once per launch instead of once per nested call; False if the interpreter's
    layout is not the one this was written against."""
    try:
        from triton.runtime import interpreter as ti
    except ImportError:
        return False
    executor = getattr(ti, "GridExecutor", None)
    if not callable(getattr(ti, "_patch_lang", None)) or executor is None or getattr(ti, "_tasktune_once", False):
        return False
    patch_lang, run = ti._patch_lang, executor.__call__
    state = threading.local()

    def launch(self, *args, **kwargs):
        outer = getattr(state, "patched", None)
        state.patched = set()  # ids of the module globals patched in this launch
        try:
            return run(self, *args, **kwargs)
        finally:
            state.patched = outer

    def patch_once(fn):
        patched = getattr(state, "patched", None)
        if patched is None:  # outside a launch: as the interpreter does
            return patch_lang(fn)
        if id(fn.__globals__) in patched:  # a nested call of a module this launch patched
            return _NoScope()
        patched.add(id(fn.__globals__))
        return patch_lang(fn)

    ti._patch_lang = patch_once
    executor.__call__ = launch
    ti._tasktune_once = True
    return True
