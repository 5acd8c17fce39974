"""bench/serve_variants.py: a comparison run changes only its own switches on top of the main
path's settings, and switching back restores every setting the main run had."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import serve_variants  # noqa: E402
from tasktune.lora import triton_ops  # noqa: E402
from tasktune.serve import cuda_graphs, triton_attention, triton_linear  # noqa: E402


def settings():
    return (triton_ops.PDL, triton_ops.PDL_EARLY, triton_ops.LATE_WAIT, triton_linear.DELTA_BEFORE_RMS,
            triton_ops.TARGET_PROGRAMS, triton_ops.EXPAND_TILE, triton_ops.EXPAND_MAX_N, triton_ops.TILE,
            cuda_graphs.FUSED_HEAD)


def test_variants_change_their_own_switches_and_switching_back_restores_the_main_run(monkeypatch):
    for module, name, value in [(triton_ops, "PDL", False), (triton_ops, "PDL_EARLY", True),
                                (triton_ops, "LATE_WAIT", True), (triton_linear, "DELTA_BEFORE_RMS", True),
                                (triton_ops, "TARGET_PROGRAMS", 512), (triton_ops, "TILE", 4096)]:
        monkeypatch.setattr(module, name, value)  # a main run with PDL off (TASKTUNE_PDL=0)
    for module, name in [(triton_ops, "EXPAND_TILE"), (triton_ops, "EXPAND_MAX_N"), (triton_attention, "default_splits"),
                         (cuda_graphs, "FUSED_HEAD")]:
        monkeypatch.setattr(module, name, getattr(module, name))  # put back after the test, whatever happens
    monkeypatch.setattr(cuda_graphs, "DecodeStep", lambda *a, **k: ("step", k["use_graphs"]))
    engine = SimpleNamespace(decode_step="main step", model=SimpleNamespace(linear_kernel=True), cache=None,
                             pool=SimpleNamespace(stacks=SimpleNamespace(kernels=True, fused_linears=False)))
    main = serve_variants.main_path(engine)
    before = settings()

    serve_variants.switch(engine, main, "no_early")
    assert not triton_ops.PDL and not triton_ops.PDL_EARLY and triton_ops.LATE_WAIT  # PDL stays as the main run had it
    serve_variants.switch(engine, main, "rms_in_shrink", graphs=False)
    assert not triton_linear.DELTA_BEFORE_RMS and triton_ops.PDL_EARLY and engine.decode_step == ("step", False)
    serve_variants.switch(engine, main, "bgmv_1024_8192_256_2048")
    assert settings()[4:8] == (1024, 8192, 256, 2048) and triton_linear.DELTA_BEFORE_RMS
    serve_variants.switch(engine, main, "unfused_head")
    assert not cuda_graphs.FUSED_HEAD and settings()[4:8] == before[4:8]
    serve_variants.switch(engine, main, "unfused_linears", kernels=False)
    assert not engine.model.linear_kernel and not engine.pool.stacks.kernels

    serve_variants.switch(engine, main)
    assert settings() == before and engine.decode_step == "main step"
    assert engine.model.linear_kernel and engine.pool.stacks.kernels and not engine.pool.stacks.fused_linears
