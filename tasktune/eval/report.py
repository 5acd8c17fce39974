"""The comparison report: `report/index.html`, `report/results.json`, `report/summary.md`.

index.html is one self-contained file a team can mail around: inline CSS, charts as
base64 PNG data URIs, no JavaScript, no external asset (a Content-Security-Policy meta
tag enforces that in the browser). Every piece of user text - task names, labels,
inputs, predictions, config values - goes through `html.escape`.

results.json is `ComparisonResults.to_json()`, so the report can be rebuilt from it;
summary.md is the verdict and the headline numbers for a pull request or a chat.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from tasktune.eval import plots
from tasktune.eval.confusion import most_confused
from tasktune.eval.metrics import LOWER_IS_BETTER
from tasktune.eval.results import ComparisonResults, MetricValue
from tasktune.eval.verdict import VERDICT_HEADERS, Verdict, compute_verdict, ranking_rows, verdict_rows

RANKING_HEADERS = ["rank", "strategy", "weighted score", "95% CI", "task wins", "tasks", "CI method"]
CONFUSION_CLASSES = 15  # sub-matrix size shown for many-class tasks
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1150px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #4c72b0;padding-bottom:.2rem;margin-top:2.2rem}
nav a{margin-right:.8rem} table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.88rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top} th{background:#eef2f8}
td.num{text-align:right;font-variant-numeric:tabular-nums} .answer{background:#f3f7ee;border-left:4px solid #6a9f3a;padding:.7rem 1rem}
.flag{color:#b00020} .muted{color:#777} img{max-width:100%;height:auto;margin:.3rem 0} .grid{display:flex;flex-wrap:wrap;gap:1rem}
pre{background:#f6f6f6;padding:.6rem;overflow-x:auto;font-size:.8rem} td.text{max-width:420px;word-wrap:break-word}
"""
SECTIONS = [
    ("verdict", "Verdict"), ("metrics", "Per-task metrics"), ("curves", "Training curves"), ("transfer", "Transfer"),
    ("confusion", "Confusion"), ("errors", "Error samples"), ("costs", "Costs"), ("forgetting", "Forgetting"),
    ("environment", "Environment"),
]


def e(value: Any) -> str:
    """HTML-escape any value as text (quotes too: safe inside attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"num" if i in numeric else "text"}">{e(c)}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(uri: str | None, alt: str) -> str:
    return f'<img src="{uri}" alt="{e(alt)}">' if uri else ""


def fmt(mv: MetricValue | None) -> str:
    """0.8123 [0.79, 0.83] -> '81.2% [79.0, 83.0]'."""
    if mv is None or mv.value is None:
        return "-"
    ci = f" [{100 * mv.ci_low:.1f}, {100 * mv.ci_high:.1f}]" if mv.ci_low is not None and mv.ci_high is not None else ""
    return f"{100 * mv.value:.1f}%{ci}"


def _metric_names(results: ComparisonResults, task: str) -> list[str]:
    names: list[str] = []
    for s in results.strategies.values():
        for m in s.tasks[task].metrics if task in s.tasks else ():
            if m not in names:
                names.append(m)
    primary = results.tasks[task].primary_metric
    return sorted(names, key=lambda m: (m != primary, m in LOWER_IS_BETTER, names.index(m)))


def _verdict_html(v: Verdict) -> str:
    parts = [f'<p class="answer">{e(v.answer)}</p>', "<h3>Per task</h3>", _table(VERDICT_HEADERS, verdict_rows(v), (3, 5))]
    parts += ["<h3>Aggregate ranking</h3>", _table(RANKING_HEADERS, ranking_rows(v), (2,))]
    if v.negative_transfer:
        items = "".join(
            f"<li class='flag'>{e(n.strategy)} on {e(n.task)}: {e(f'{n.comparison.diff:+.1%}')} {e(n.metric)} vs "
            f"{e(n.baseline)} ({e(n.comparison.method)})</li>"
            for n in v.negative_transfer
        )
        parts.append(f"<h3>Negative transfer</h3><ul>{items}</ul>")
    else:
        parts.append("<p class='muted'>No negative transfer detected beyond the confidence intervals.</p>")
    return "".join(parts)


def _metrics_html(results: ComparisonResults) -> str:
    parts = []
    for task, info in results.tasks.items():
        names = _metric_names(results, task)
        rows, values = [], {}
        for sname, s in results.strategies.items():
            tr = s.tasks.get(task)
            if tr is None:
                continue
            values[sname] = tr.metrics
            rows.append([sname, *(fmt(tr.metrics.get(m)) for m in names), tr.n, tr.invalid])
        parts.append(f"<h3>{e(task)} <span class='muted'>({e(info.kind)}, primary: {e(info.primary_metric)}, weight {e(info.weight)})</span></h3>")
        parts.append(_table(["strategy", *names, "n", "invalid"], rows, range(1, len(names) + 3)))
        shown = [m for m in names if m not in LOWER_IS_BETTER]
        if values and shown:
            parts.append(_img(plots.metric_bars(task, values, shown), f"{task} metrics by strategy"))
    return "".join(parts)


def _curves_html(results: ComparisonResults) -> str:
    imgs = [_img(plots.training_curves(name, s.curves), f"training curve of {name}") for name, s in results.strategies.items()]
    imgs = [i for i in imgs if i]
    return f"<div class='grid'>{''.join(imgs)}</div>" if imgs else "<p class='muted'>No training curves recorded.</p>"


def _transfer_html(results: ComparisonResults) -> str:
    t = results.transfer
    parts = []
    if t is None:
        parts.append("<p class='muted'>No transfer matrix was measured.</p>")
    else:
        uri = plots.heatmap("task transfer", t.values, t.tasks, t.tasks, diverging=True, xlabel="trained with", ylabel="evaluated on")
        parts.append(f"<p>{e(t.description)}</p>{_img(uri, 'transfer heatmap')}")
    for name, s in results.strategies.items():
        if s.notes.get("groups"):
            groups = "; ".join(", ".join(g) for g in s.notes["groups"])
            parts.append(f"<p><b>{e(name)}</b> task groups: {e(groups)}</p>")
        if s.notes.get("cgc_gates"):
            parts.append(_gates_html(name, s.notes["cgc_gates"]))
    return "".join(parts)


def _short_layers(names: list[str]) -> list[str]:
    """'encoder.layer.3.attention.self.query' -> '3.attention.query': the block number and
    the module path inside the block without filler words, enough to read a heatmap axis;
    the full names where shortening would make two alike."""
    filler = {"self", "self_attn", "mlp", "dense"}
    short = []
    for name in names:
        parts = name.split(".")
        at = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        inner = parts[at + 1:] if at is not None else parts
        kept = [p for p in inner if p not in filler] or inner
        short.append(".".join(([parts[at]] if at is not None else []) + kept))
    return short if len(set(short)) == len(short) else list(names)


def _gates_html(name: str, gates: dict) -> str:
    """CGC: per task and layer, the gate's total weight on the task-common experts
    (1 = the task uses only shared experts, 0 = only its own)."""
    common = [i for i, label in enumerate(gates["experts"]) if label.startswith("common")]
    layers = list(gates["gates"])
    tasks = list(next(iter(gates["gates"].values()), {}))
    matrix = [[sum(gates["gates"][layer][task][i] for i in common) for layer in layers] for task in tasks]
    cols = _short_layers(layers)
    uri = plots.heatmap(f"{name}: gate weight on common experts", matrix, tasks, cols, xlabel="adapted layer", ylabel="task")
    return f"<p>CGC gates of <b>{e(name)}</b>: share of each task's gate on the task-common experts, per adapted layer.</p>{_img(uri, 'CGC gate heatmap')}"


def _confusion_html(results: ComparisonResults) -> str:
    parts = []
    for task in results.tasks:
        for sname, s in results.strategies.items():
            tr = s.tasks.get(task)
            if tr is None or tr.confusion is None:
                continue
            c = tr.confusion
            labels, m = most_confused(c.labels, c.matrix, CONFUSION_CLASSES)
            note = f" (the {len(labels)} most-confused of {len(c.labels)} classes)" if len(labels) < len(c.labels) else ""
            parts.append(f"<h3>{e(task)} / {e(sname)}{e(note)}</h3><div class='grid'>")
            parts.append(_img(plots.heatmap(f"{task} / {sname}", m.tolist(), labels, labels, integer=True,
                                            xlabel="predicted", ylabel="gold"), f"confusion matrix {task} {sname}"))
            words = "".join(f"<li>{e(p.describe())}</li>" for p in c.top_confusions) or "<li>no confusions</li>"
            worst = sorted(c.per_class, key=lambda x: (x.f1, x.label))[:10]
            pr = _table(["class", "precision", "recall", "F1", "support"],
                        [[x.label, f"{x.precision:.2f}", f"{x.recall:.2f}", f"{x.f1:.2f}", x.support] for x in worst], (1, 2, 3, 4))
            parts.append(f"<div><b>Top confusions</b><ol>{words}</ol><b>Weakest classes</b>{pr}</div></div>")
    return "".join(parts) or "<p class='muted'>No classification tasks.</p>"


def _errors_html(results: ComparisonResults) -> str:
    parts = []
    for task in results.tasks:
        for sname, s in results.strategies.items():
            tr = s.tasks.get(task)
            if tr is None or not tr.errors:
                continue
            rows = [[x.uid, x.input, x.expected, "(invalid output)" if x.predicted is None else x.predicted] for x in tr.errors]
            parts.append(f"<h3>{e(task)} / {e(sname)}</h3>" + _table(["id", "input", "expected", "predicted"], rows))
    return "".join(parts) or "<p class='muted'>No errors sampled.</p>"


_COSTS = [("trainable_params", "trainable parameters", "parameters"), ("train_seconds", "training time", "s"),
          ("peak_memory_mb", "peak training memory", "MB"), ("serving_memory_mb", "serving memory", "MB"),
          ("add_task_seconds", "adding one task: time", "s"), ("add_task_params", "adding one task: parameters", "parameters")]


def _costs_html(results: ComparisonResults) -> str:
    rows = [[name, *(getattr(s.costs, f) if getattr(s.costs, f) is not None else "-" for f, _, _ in _COSTS)]
            for name, s in results.strategies.items()]
    charts = [plots.cost_bars(title, {n: getattr(s.costs, f) for n, s in results.strategies.items()}, unit)
              for f, title, unit in _COSTS]
    imgs = "".join(_img(c, "cost chart") for c in charts if c)
    return _table(["strategy", *(t for _, t, _ in _COSTS)], rows, range(1, 7)) + f"<div class='grid'>{imgs}</div>"


def _forgetting_html(results: ComparisonResults) -> str:
    if not results.forgetting:
        return "<p class='muted'>Forgetting was not measured.</p>"
    rows = [[f.strategy, f.adapter, f.benchmark, f.metric, f"{f.before:.4f}", f"{f.after:.4f}", f"{f.delta:+.4f}"]
            for f in results.forgetting]
    return _table(["strategy", "adapter", "benchmark", "metric", "before", "after", "change"], rows, (4, 5, 6))


def _environment_html(results: ComparisonResults) -> str:
    env = results.environment
    rows = [["device", env.device], ["created", env.created]] + [[f"version: {k}", v] for k, v in env.versions.items()]
    rows += [[f"seed: {k}", v] for k, v in env.seeds.items()]
    config = json.dumps(env.config, indent=2, default=str, ensure_ascii=False)
    return _table(["", ""], rows) + f"<h3>Config</h3><pre>{e(config)}</pre>"


def render_html(results: ComparisonResults, verdict: Verdict) -> str:
    """The whole self-contained page as a string."""
    bodies = {
        "verdict": _verdict_html(verdict), "metrics": _metrics_html(results), "curves": _curves_html(results),
        "transfer": _transfer_html(results), "confusion": _confusion_html(results), "errors": _errors_html(results),
        "costs": _costs_html(results), "forgetting": _forgetting_html(results), "environment": _environment_html(results),
    }
    nav = "".join(f'<a href="#{k}">{e(t)}</a>' for k, t in SECTIONS)
    sections = "".join(f'<section id="{k}"><h2>{e(t)}</h2>{bodies[k]}</section>' for k, t in SECTIONS)
    tasks = ", ".join(results.tasks)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>tasktune report: {e(tasks)}</title><style>{_CSS}</style></head><body>"
        f"<h1>One model for all tasks, or one adapter per task?</h1>"
        f"<p class='muted'>Strategies: {e(', '.join(results.strategies))} &middot; tasks: {e(tasks)}</p>"
        f"<nav>{nav}</nav>{sections}</body></html>"
    )


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(results: ComparisonResults, verdict: Verdict) -> str:
    """Verdict, ranking, primary metric per task and strategy, costs."""
    strategies = list(results.strategies)
    primary = [
        [t, info.primary_metric, *(fmt(results.strategies[s].tasks[t].metrics.get(info.primary_metric))
                                   if t in results.strategies[s].tasks else "-" for s in strategies)]
        for t, info in results.tasks.items()
    ]
    costs = [[n, s.costs.trainable_params, s.costs.train_seconds, s.costs.serving_memory_mb, s.costs.add_task_seconds]
             for n, s in results.strategies.items()]
    return "\n\n".join([
        "# tasktune comparison", verdict.answer,
        "## Per-task verdict", _md_table(VERDICT_HEADERS, verdict_rows(verdict)),
        "## Aggregate ranking", _md_table(RANKING_HEADERS, ranking_rows(verdict)),
        "## Primary metric (95% CI)", _md_table(["task", "metric", *strategies], primary),
        "## Costs", _md_table(["strategy", "trainable params", "train s", "serving MB", "add-a-task s"],
                              [[("-" if c is None else c) for c in r] for r in costs]),
    ]) + "\n"


def write_report(
    results: ComparisonResults, out_dir: str | Path, *, verdict: Verdict | None = None, n_resamples: int = 1000, seed: int = 0
) -> dict[str, Path]:
    """Write `<out_dir>/report/{index.html, results.json, summary.md}`; returns
    {"html", "json", "markdown"} -> path. The verdict is computed if not given."""
    verdict = verdict or compute_verdict(results, n_resamples=n_resamples, seed=seed)
    report = Path(out_dir) / "report"
    report.mkdir(parents=True, exist_ok=True)
    paths = {"html": report / "index.html", "json": report / "results.json", "markdown": report / "summary.md"}
    paths["html"].write_text(render_html(results, verdict), encoding="utf-8")
    results.save(paths["json"])
    paths["markdown"].write_text(render_markdown(results, verdict), encoding="utf-8")
    return paths
