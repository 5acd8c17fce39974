"""`tasktune serve`: one base model, the adapters of runs or PEFT folders, one endpoint.

Paths named on the command line are trusted (the operator chose them); adapters loaded
later through the API must live under `--adapter-root`. An encoder run is served alone,
adapters and heads as it was trained (encoder_engine.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tasktune.errors import TasktuneError
from tasktune.tasks.spec import Task

CONFIG = "adapter_config.json"


@dataclass
class Served:
    """What the command line names: adapters (name -> folder), the base model a run names
    (None when only adapter folders are given), and the runs' tasks with the adapter that
    answers each (for /v1/tasks/{task}/predict)."""

    adapters: dict[str, Path] = field(default_factory=dict)
    base: str | None = None
    tasks: dict[str, Task] = field(default_factory=dict)
    task_adapters: dict[str, str] = field(default_factory=dict)


def collect_adapters(paths: list[Path]) -> Served:
    """Every adapter in the given run folders and PEFT adapter folders, with what the runs
    record about their base model and tasks."""
    from tasktune.model.restore import read_run, run_task_adapters, run_tasks

    served = Served()
    found = served.adapters
    for path in map(Path, paths):
        if (path / CONFIG).is_file():
            folders = [path]
        elif (path / "run.json").is_file():
            cfg, record = read_run(path)
            if record.get("family") == "encoder":
                raise TasktuneError(f"{path}: an encoder run is served alone (`tasktune serve {path}`)")
            served.base = served.base or record.get("model_path") or record.get("model")
            folders = sorted(p for p in (path / "adapters").iterdir() if (p / CONFIG).is_file())
            for task in run_tasks(cfg, record):
                if task.name in served.tasks:
                    raise TasktuneError(f"task '{task.name}' is served by two runs (the second: {path}); serve one of them")
                served.tasks[task.name] = task
            served.task_adapters.update(run_task_adapters(record))
        else:
            raise TasktuneError(f"{path}: neither a PEFT adapter folder ({CONFIG}) nor a tasktune run folder (run.json)")
        for folder in folders:
            if folder.name in found:
                raise TasktuneError(f"adapter name '{folder.name}' appears twice ({found[folder.name]} and {folder})")
            found[folder.name] = folder
    return served


def is_encoder_run(path: Path) -> bool:
    record = Path(path) / "run.json"
    return record.is_file() and json.loads(record.read_text()).get("family") == "encoder"


def build_server(paths: list[Path], base: str | None, *, device: str = "cpu", adapter_root: str | None = None,
                 api_key: str | None = None, max_resident: int = 8, max_rank: int = 64, max_running: int = 32,
                 max_waiting: int = 256, max_len: int = 512, dtype: str | None = None, compile: bool | None = None):
    """The app and the names it serves: adapters, or an encoder run's tasks. The limits
    mirror vLLM's: max_running = --max-num-seqs, max_len = --max-model-len, max_resident =
    --max-loras, max_rank = --max-lora-rank; an encoder run reads max_running as its batch.
    compile: the decode step through torch.compile (None: on a GPU). On a GPU the decode
    step's CUDA graphs are captured here, before the first request."""
    from tasktune.model.load import resolve
    from tasktune.serve.api import create_app
    from tasktune.serve.task_predictor import task_predictor
    from tasktune.serve.engine import Engine
    from tasktune.serve.torch_thread import TorchThread

    device = resolve_device(device)
    if len(paths) == 1 and is_encoder_run(paths[0]):
        return build_encoder_server(Path(paths[0]), base, device=device, adapter_root=adapter_root, api_key=api_key,
                                    max_batch=max_running)
    served = collect_adapters(paths)
    adapters = served.adapters
    base = base or served.base
    if not base:
        raise TasktuneError("name the base model with --base (a local Hugging Face folder)")
    where, local = resolve(base)
    if not local:
        raise TasktuneError(f"--base '{base}': the server loads local model folders only")
    def load() -> Engine:
        engine = Engine.from_pretrained(
            where, adapter_root=adapter_root, max_resident=max_resident, max_rank=max_rank, device=device,
            dtype=_dtype(dtype), max_running=max_running, max_waiting=max_waiting, max_len=max_len,
            compile=device.startswith("cuda") if compile is None else compile,
        )
        root, engine.pool.root = engine.pool.root, None  # command-line adapters are trusted
        try:
            for name, folder in adapters.items():
                engine.pool.register(name, folder)
        finally:
            engine.pool.root = root
        engine.warmup(progress=True)
        return engine

    thread = TorchThread("tasktune-engine")  # loads the model and then steps it (torch_thread.py)
    try:
        engine = thread.call(load)
    except BaseException:
        thread.close()
        raise
    predictor = task_predictor(served.tasks) if served.tasks else None  # adapter folders only: the built-in tasks
    app = create_app(engine, api_key=api_key, tasks=predictor, task_adapters=served.task_adapters, torch_thread=thread)
    return app, sorted(adapters)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when PyTorch sees a GPU, else 'cpu'; a named device must exist."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TasktuneError(f"--device '{device}': use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise TasktuneError(f"--device '{device}': PyTorch sees {torch.cuda.device_count()} GPU(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise TasktuneError(f"--device '{device}': use auto, cpu, cuda or cuda:N")
    return device


def _dtype(name: str | None):
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name is None or name == "auto":
        return None
    if name not in dtypes:
        raise TasktuneError(f"--dtype '{name}': use one of auto, {', '.join(dtypes)}")
    return dtypes[name]


def build_encoder_server(run_dir: Path, base: str | None, *, device: str = "cpu", adapter_root: str | None = None,
                         api_key: str | None = None, max_batch: int = 32):
    from tasktune.serve.api import create_app
    from tasktune.serve.encoder_engine import EncoderEngine

    if base or adapter_root:
        raise TasktuneError(f"{run_dir}: an encoder run serves the model, adapters and heads it was trained with; "
                            "leave out --base and --adapter-root")
    engine = EncoderEngine.from_run(run_dir, device=device, max_batch=max_batch)
    return create_app(engine, api_key=api_key), list(engine.tasks)
