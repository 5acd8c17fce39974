"""The `tasktune` command: parse, call the library, print. Nothing here is needed from Python."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from tasktune.errors import TasktuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune one base model for many tasks; compare strategies; serve adapters.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect task data: counts, labels, lengths, rendered prompts.")
app.add_typer(data_app, name="data")
console = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)


def friendly(fn):
    """User errors become one clear message and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TasktuneError as exc:
            err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@data_app.command("stats")
@friendly
def data_stats_cmd(
    config: Path = typer.Argument(..., help="project YAML"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip bad rows (listed in the summary)"),
):
    """Per task and split: records, label distribution, token lengths, mixing rates."""
    from tasktune.config import load_config
    from tasktune.data.stats import data_stats, format_stats
    from tasktune.model.load import load_tokenizer

    cfg = load_config(config)
    stats = data_stats(cfg, load_tokenizer(cfg.model), skip_invalid=skip_invalid)
    if as_json:
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
    else:
        format_stats(stats, console)


@data_app.command("preview")
@friendly
def data_preview_cmd(
    config: Path = typer.Argument(...),
    task: str = typer.Option(..., "--task", help="task name"),
    n: int = typer.Option(3, "-n", help="how many examples"),
    seed: Optional[int] = typer.Option(None, "--seed", help="template seed (default: the config's)"),
):
    """Show rendered prompts and targets exactly as training sees them."""
    from tasktune.config import load_config
    from tasktune.data.stats import preview

    cfg = load_config(config)
    for example, rendered in preview(cfg, task, n, cfg.seed if seed is None else seed):
        console.rule(f"{example.uid}  ({example.origin})  template {rendered.template_index}", style="dim")
        console.print("[bold]prompt[/]", markup=True)
        console.print(rendered.prompt, markup=False, highlight=False)
        console.print("[bold]target[/]", markup=True)
        console.print(rendered.target, markup=False, highlight=False)


@app.command()
@friendly
def train(
    config: Path = typer.Argument(...),
    strategy: str = typer.Option("single", "--strategy", help="single | multi | cgc | grouped | full"),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder (default runs/<config>-<strategy>)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in --out"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid"),
):
    """Train one strategy; writes PEFT adapters, heads, metrics and run.json."""
    from tasktune.config import load_config
    from tasktune.train.distributed import is_main_process
    from tasktune.train.run import train_strategy

    cfg = load_config(config)
    out = out or Path("runs") / f"{config.stem}-{strategy}"
    _, result, data = train_strategy(cfg, strategy, out, resume=resume, skip_invalid=skip_invalid)
    if not is_main_process():  # under torchrun / accelerate launch: one report, from rank 0
        return
    for task, why in data.skipped_tasks.items():
        err.print(f"skipped task {task}: {why}", highlight=False)
    console.print(f"trained {strategy}: {result.steps} steps in {result.seconds:.0f}s -> {out}", highlight=False)


@app.command("eval")
@friendly
def eval_cmd(
    run_dir: Path = typer.Argument(..., help="a folder written by `tasktune train`"),
    mode: str = typer.Option("auto", "--mode", help="causal LMs: auto | likelihood | generate"),
):
    """Score a trained run on every task's test split, with 95% bootstrap CIs."""
    from tasktune.eval.evaluate import evaluate_run, print_scores

    result = evaluate_run(run_dir, mode=mode)
    for task, rows in result.skipped.items():
        err.print(f"{task}: {len(rows)} invalid test row(s) left out of the scores (listed in eval.json), "
                  f"first: {rows[0]}", highlight=False)
    print_scores(result.scores, console)


@app.command()
@friendly
def compare(
    config: Path = typer.Argument(...),
    strategies: str = typer.Option("single,multi", "--strategies"),
    out: Optional[Path] = typer.Option(None, "--out"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid"),
):
    """Train every strategy, evaluate all on the same test sets, write report/."""
    from tasktune.compare import run_compare
    from tasktune.config import load_config

    cfg = load_config(config)
    out = out or Path("runs") / f"{config.stem}-compare"
    run_compare(cfg, [s.strip() for s in strategies.split(",") if s.strip()], out, skip_invalid=skip_invalid, console=console)


@app.command()
@friendly
def demo(out: Path = typer.Option(Path("runs/demo"), "--out")):
    """CPU demo: MiniLM-L6, CLINC150 + SNIPS subsets, `single` vs `multi`, verdict + report."""
    from tasktune.compare import run_demo

    run_demo(out, console=console)


@app.command()
@friendly
def export(
    run_dir: Path = typer.Argument(...),
    format: str = typer.Option("peft", "--format", help="peft | merged"),
    out: Optional[Path] = typer.Option(None, "--out", help="default RUN_DIR/export-<format>"),
):
    """Write a run's adapters as PEFT folders (vLLM, TGI, LoRAX) or merged full models."""
    from tasktune.export import export_run

    out = out or Path(run_dir) / f"export-{format}"
    for path in export_run(run_dir, out, format):
        console.print(f"wrote {path}", highlight=False)


@app.command()
@friendly
def serve(
    paths: list[Path] = typer.Argument(..., help="run folders and/or PEFT adapter folders, or one encoder run"),
    base: Optional[str] = typer.Option(None, "--base", help="base model folder (default: the run's model)"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    device: str = typer.Option("auto", "--device", help="auto (cuda when there is a GPU) | cpu | cuda | cuda:N"),
    adapter_root: Optional[str] = typer.Option(None, "--adapter-root", help="folder adapters may be loaded from at run time"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TASKTUNE_API_KEY"),
    max_num_seqs: int = typer.Option(32, "--max-num-seqs", min=1, help="sequences decoded together (encoder: batch size)"),
    max_model_len: int = typer.Option(512, "--max-model-len", min=2, help="prompt + generated tokens per sequence"),
    max_loras: int = typer.Option(8, "--max-loras", min=1, help="adapters resident on the device (LRU beyond)"),
    max_lora_rank: int = typer.Option(64, "--max-lora-rank", min=1),
    max_waiting: int = typer.Option(256, "--max-waiting", min=1, help="queued requests before 429"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="decode step through torch.compile (default: on a GPU)"),
):
    """OpenAI-compatible server: one base model, many adapters (model = adapter name). An
    encoder run answers its tasks at /v1/tasks/{task}/predict."""
    import uvicorn

    from tasktune.serve.launch import build_server, is_encoder_run

    app_, names = build_server(
        paths, base, device=device, adapter_root=adapter_root, api_key=api_key, max_resident=max_loras,
        max_rank=max_lora_rank, max_running=max_num_seqs, max_waiting=max_waiting, max_len=max_model_len, dtype=dtype,
        compile=compile,
    )
    what = "task(s)" if len(paths) == 1 and is_encoder_run(paths[0]) else "adapter(s)"
    console.print(f"serving {len(names)} {what} on http://{host}:{port}/v1: {', '.join(names)}", highlight=False)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
