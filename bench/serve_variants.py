"""The serve bench's comparison runs ("variants"): the cases each one times and the switches
it flips (module settings and the engine's decode step), so that every variant is measured
in the same run, on the same work, as the main figures."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MainPath:
    """The engine's settings in the main run, restored after the variants."""
    decode_step: object
    kernels: bool  # Triton LoRA kernels
    linear_kernel: bool  # fused decode linears
    bgmv: tuple[int, int, int, int]  # triton_ops TARGET_PROGRAMS, EXPAND_TILE, EXPAND_MAX_N, TILE
    switches: tuple[bool, bool, bool, bool]  # triton_ops PDL, PDL_EARLY, LATE_WAIT; triton_linear.DELTA_BEFORE_RMS
    fused_head: bool = True  # cuda_graphs.FUSED_HEAD


def main_path(engine) -> MainPath:
    from tasktune.lora import triton_ops
    from tasktune.serve import cuda_graphs, triton_linear
    return MainPath(engine.decode_step, engine.pool.stacks.kernels, engine.model.linear_kernel,
                    (triton_ops.TARGET_PROGRAMS, triton_ops.EXPAND_TILE, triton_ops.EXPAND_MAX_N, triton_ops.TILE),
                    (triton_ops.PDL, triton_ops.PDL_EARLY, triton_ops.LATE_WAIT, triton_linear.DELTA_BEFORE_RMS),
                    cuda_graphs.FUSED_HEAD)


def variant_table(kernels: bool, few: str, many: str, requested: str | None,
                  autotune: bool) -> dict[str, tuple[bool, bool, tuple[str, ...]]]:
    """label -> (CUDA graphs, Triton LoRA kernels, the cases it times). requested: the
    comma-separated labels to keep (None: all); any bgmv_<shrink programs>_<expand tile>
    [_<expand columns>[_<shrink tile>]] label in it runs the BGMV pair at those sizes."""
    lora = (few, many)
    every = ("base", few, many)
    table = {"no_graphs": (False, kernels, ("base", many)),
             "graphs_torch_lora": (True, False, lora),
             "attention_split4": (True, kernels, ("base", many)),  # context in 4 chunks (flash-decoding)
             "unfused_linears": (True, kernels, every),  # cuBLAS + LoRA pairs
             "fused_lora": (True, kernels, lora),  # LoRA inside the fused linears
             "fused_lora_no_pdl": (True, kernels, lora),  # ... without PDL
             "no_pdl": (True, kernels, every),  # no programmatic dependent launch
             # PDL as in session 9: each kernel waits first, lets the next launch after its main loop
             "pdl_wait_first": (True, kernels, every),
             "no_early": (True, kernels, every),  # the next launch after the main loop
             "no_late_wait": (True, kernels, lora),  # linears wait before their loop
             "bgmv_1024_2048": (True, kernels, lora),  # session 9's BGMV sizes
             "rms_in_shrink": (True, kernels, lora),  # the BGMV shrink applies RMSNorm's 1 / rms (session 10)
             "unfused_head": (True, kernels, every),  # final norm, cuBLAS LM head, argmax: three launches (session 11)
             "logprobs": (True, kernels, every),  # every request asks for its tokens' log-probabilities
             "logprobs5": (True, kernels, every),  # ... and 5 alternatives a token
             # every request bound to 4 answers (guided_choice): its own main-run tokens and 3 decoys
             "guided": (True, kernels, every),
             # every request bound to a regex (xgrammar, serve/grammar.py) that any token but the end one continues
             "guided_regex": (True, kernels, every),
             "guided_regex_logits_path": (True, kernels, every),  # ... each step through the logits (session 18)
             "guided_regex_sampled": (True, kernels, every),  # ... sampled as `sampled` is, masked rows drawn on the device
             # every request sampled (temperature 0.8, top-p 0.95, no seed): rows drawn together
             "sampled": (True, kernels, every),
             "sampled_seeded": (True, kernels, every),  # ... request i with seed i
             "sampled_top_k": (True, kernels, every),  # ... top-k 50 instead of top-p (Hugging Face's default)
             "sampled_top_k_top_p": (True, kernels, every),  # ... temperature 0.7, top-k 20, top-p 0.8 (Qwen2.5's)
             "sampled_logits_path": (True, kernels, every),  # ... no seed, through the logits (as up to session 18)
             "sampled_per_row": (True, kernels, every)}  # ... no seed, one row at a time (as up to session 16)
    labels = requested.split(",") if requested else []
    table.update({label: (True, kernels, lora) for label in labels if label.startswith("bgmv_")})
    if requested:
        table = {k: v for k, v in table.items() if k in labels}
    if autotune:  # Inductor's Triton GEMM templates timed against cuBLAS (a longer compile)
        table["gemm_autotune"] = (True, kernels, ("base", many))
    return table


def switch(engine, main: MainPath, label: str | None = None, graphs: bool = True, kernels: bool | None = None) -> None:
    """Put the engine on variant `label`'s path (a new decode step, its graphs captured on
    first use): the main path's settings with the variant's own changes, or back on the main
    path (label None)."""
    from tasktune.lora import triton_ops
    from tasktune.serve import cuda_graphs, sampling, triton_attention, triton_linear
    from tasktune.serve import engine as engine_module

    name = label or ""
    triton_attention.default_splits = 4 if name == "attention_split4" else 0
    sampling.BATCHED_SAMPLING = name != "sampled_per_row"
    engine_module.GRAMMAR_AHEAD = name != "guided_regex_logits_path"
    engine_module.DEVICE_SAMPLING = name not in ("sampled_logits_path", "sampled_per_row")
    engine.model.linear_kernel = main.linear_kernel and name != "unfused_linears"
    engine.pool.stacks.fused_linears = name.startswith("fused_lora")
    pdl, early, late, before_rms = main.switches
    triton_linear.DELTA_BEFORE_RMS = before_rms and name != "rms_in_shrink"
    cuda_graphs.FUSED_HEAD = main.fused_head and name != "unfused_head"
    triton_ops.PDL = pdl and not name.endswith("no_pdl")
    triton_ops.PDL_EARLY = early and name not in ("pdl_wait_first", "no_early")
    triton_ops.LATE_WAIT = late and name not in ("pdl_wait_first", "no_late_wait")
    sizes = [int(v) for v in name.split("_")[1:5]] if name.startswith("bgmv_") else []
    (triton_ops.TARGET_PROGRAMS, triton_ops.EXPAND_TILE, triton_ops.EXPAND_MAX_N,
     triton_ops.TILE) = sizes + list(main.bgmv)[len(sizes):]
    triton_ops.launch_config.cache_clear()
    engine.pool.stacks.kernels = main.kernels if kernels is None else kernels
    if label is None:
        engine.decode_step = main.decode_step
        return
    if name == "gemm_autotune":
        engine.model.compile_decode(autotune=True)
    engine.decode_step = cuda_graphs.DecodeStep(engine.model, engine.cache, engine.pool.stacks, use_graphs=graphs)


def guided_answers(tokens: list[list[int]], vocab: int, decoys: int = 3) -> list[tuple[tuple[int, ...], ...]]:
    """Each request's answers for the `guided` variant: its own main-run tokens (so the
    constrained greedy path must give them again) and `decoys` random sequences as long."""
    import torch

    g = torch.Generator().manual_seed(0)
    fakes = [tuple(torch.randint(3, vocab, (len(tokens[0]),), generator=g).tolist()) for _ in range(decoys)]
    return [(tuple(t), *fakes) for t in tokens]


def lora_in_launch(engine, case: str) -> None:
    """LoRA of at most 4 adapters inside the fused linears (LoraStacks.few_linears) for the
    serve bench's case `a<n>_inlaunch`, else the engine's default, the BGMV pair's delta."""
    if engine.pool.stacks is not None:
        engine.pool.stacks.few_linears = case.endswith("_inlaunch")
