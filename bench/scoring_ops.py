"""Where prompt scoring's time goes: each op of `prompt_scoring.score_prompts`' LM-head
stage on one chunk of SCORING_ROWS positions (Qwen2.5-0.5B's head, bf16), timed alone
(mean of 20 calls after one, synced around them).

    PYTHONPATH=. python3 bench/scoring_ops.py      # GPU: writes $OUT/ and bench/results/
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from common import device_name, versions, write_json  # noqa: E402


def timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    from tasktune.serve.sampling import logprob_table

    rows, hidden, vocab = 512, 896, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(rows, hidden, device="cuda", generator=g).bfloat16()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) / hidden ** 0.5).bfloat16()
    t = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    logits = torch.nn.functional.linear(h, w)
    x = logits.float()
    ops = {
        "lm_head": lambda: torch.nn.functional.linear(h, w),
        "float": lambda: logits.float(),
        "logsumexp": lambda: torch.logsumexp(x, -1, keepdim=True),
        "topk1": lambda: x.topk(1, dim=-1),
        "topk5": lambda: x.topk(5, dim=-1),
        "max": lambda: x.max(-1, keepdim=True),
        "gather": lambda: x.gather(1, t.view(-1, 1)),
        "rank": lambda: (x >= x.gather(1, t.view(-1, 1))).sum(-1, keepdim=True),
        "logprob_table_k1": lambda: logprob_table(x, t, 1),
        "logprob_table_k0": lambda: logprob_table(x, t, 0),
    }
    ms = {name: timed(fn) for name, fn in ops.items()}
    write_json({"bench": "scoring_ops", "device": device_name(torch.device("cuda")), "versions": versions(),
                "config": {"rows": rows, "hidden": hidden, "vocab": vocab, "reps": 20}, "ms": ms},
               "scoring_ops.json", [os.environ.get("OUT"), REPO / "bench" / "results"])
    print(f"{'op':>18} {'ms':>8}   ({rows} rows x {vocab})")
    for name, v in ms.items():
        print(f"{name:>18} {v:>8.3f}")


if __name__ == "__main__":
    main()
