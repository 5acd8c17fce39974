"""One torchrun worker for tests/test_ddp.py: runs `tasktune train` for every job of a JSON
list, in one launch (process start-up is most of the cost on a CPU).

    torchrun --nproc_per_node 2 tests/ddp_worker.py jobs.json

A job is {"config": ..., "strategy": ..., "out": ...}, optionally with "resume_from": a
finished run folder whose checkpoint "at_step" is copied to "out" (rank 0, while the
others wait) before training resumes there, as if the run had died after that step.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from tasktune import cli
from tasktune.train.distributed import is_main_process, wait_for_everyone


def copy_checkpoint(done: Path, out: Path, step: int) -> None:
    """`out` = the run folder `done` as it was right after checkpoint `step` was written."""
    shutil.copytree(done / "checkpoints" / f"checkpoint-{step}", out / "checkpoints" / f"checkpoint-{step}")
    shutil.copy(done / "metrics.jsonl", out / "metrics.jsonl")  # later rows: dropped on resume


def main(jobs_file: str) -> None:
    torch.set_num_threads(1)
    for job in json.loads(Path(jobs_file).read_text()):
        args = ["train", job["config"], "--strategy", job["strategy"], "--out", job["out"]]
        if "resume_from" in job:  # follows the job that wrote it, so the process group is up
            if is_main_process():
                copy_checkpoint(Path(job["resume_from"]), Path(job["out"]), job["at_step"])
            wait_for_everyone()
            args.append("--resume")
        cli.app(args, standalone_mode=False)


if __name__ == "__main__":
    main(sys.argv[1])
