"""The report's charts, as self-contained PNG data URIs.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no global
state, no display needed), rendered to PNG and base64-encoded, so index.html needs no
files or network beside itself.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tasktune.eval.results import MetricValue, TrainingCurve

DPI = 90


def to_data_uri(fig: Figure) -> str:
    """Render a figure to a `data:image/png;base64,...` URI."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def metric_bars(title: str, values: dict[str, dict[str, MetricValue]], metrics: Sequence[str]) -> str:
    """Grouped bars: one group per metric, one bar per strategy, 95% CI error bars.
    values: strategy -> metric -> MetricValue."""
    strategies = list(values)
    fig = Figure(figsize=(max(4.0, 1.3 * len(metrics) * max(1, len(strategies)) / 2 + 2), 3.2))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(strategies))
    x = np.arange(len(metrics))
    for i, s in enumerate(strategies):
        mv = [values[s].get(m) for m in metrics]
        h = np.array([v.value if v is not None and _finite(v.value) else np.nan for v in mv])
        lo = np.array([v.value - v.ci_low if v is not None and _finite(v.ci_low) and _finite(v.value) else 0 for v in mv])
        hi = np.array([v.ci_high - v.value if v is not None and _finite(v.ci_high) and _finite(v.value) else 0 for v in mv])
        ax.bar(x + (i - (len(strategies) - 1) / 2) * width, h, width, label=s,
               yerr=np.vstack([np.maximum(lo, 0), np.maximum(hi, 0)]), capsize=3)
    ax.set_xticks(x, list(metrics), rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (95% CI)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return to_data_uri(fig)


def training_curves(title: str, curve: TrainingCurve) -> str | None:
    """One line per task: loss against step. None when nothing was logged."""
    if not curve.steps or not curve.losses:
        return None
    fig = Figure(figsize=(5.5, 3.2))
    ax = fig.add_subplot()
    steps = np.array(curve.steps)
    for task, losses in curve.losses.items():
        n = min(len(steps), len(losses))
        y = np.array([np.nan if v is None else v for v in losses[:n]], dtype=float)
        ok = np.isfinite(y)
        ax.plot(steps[:n][ok], y[ok], label=task, marker=".", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return to_data_uri(fig)


def heatmap(
    title: str,
    matrix: Sequence[Sequence[float | None]],
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    diverging: bool = False,
    integer: bool = False,
    xlabel: str = "",
    ylabel: str = "",
) -> str:
    """Annotated heatmap. diverging: red/blue centred on 0 (transfer gains/losses);
    else a sequential map (confusion counts). Missing cells (None) are grey."""
    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    # cells ~0.42 in on a side plus room for labels: square matrices stay square, a few
    # rows by many columns (CGC gates per layer) get a wide, short figure
    width = min(18.0, max(3.5, 0.42 * len(cols) + 2.5))  # past ~37 columns the cells narrow
    height = max(2.5, 0.42 * len(rows) + 2.2)
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["RdBu" if diverging else "Blues"].with_extremes(bad="#dddddd")
    if diverging:
        lim = (np.nanmax(np.abs(m)) if np.isfinite(m).any() else 0.0) or 1.0
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
    else:
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, aspect="auto")
    fig.colorbar(im, ax=ax, shrink=0.8, fraction=0.05 if len(cols) > 2 * len(rows) else 0.15)
    step = max(1, len(cols) // 60)  # at most ~60 column labels
    ax.set_xticks(range(0, len(cols), step), list(cols)[::step], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), list(rows), fontsize=7)
    if len(rows) <= 20 and len(cols) <= 20:
        top = np.nanmax(np.abs(m)) if np.isfinite(m).any() else 1.0
        # enough decimals that the largest value shows two significant digits (transfer
        # gains of a few tenths of a point would all read +0.00 otherwise)
        digits = 2 if not top or top >= 0.1 else min(6, 1 - int(np.floor(np.log10(top))))
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]) and (not integer or m[i, j] != 0):
                    text = f"{int(m[i, j])}" if integer else f"{m[i, j]:+.{digits}f}" if diverging else f"{m[i, j]:.{digits}f}"
                    dark = abs(m[i, j]) > 0.6 * (top or 1)
                    ax.text(j, i, text, ha="center", va="center", fontsize=6, color="white" if dark else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return to_data_uri(fig)


def cost_bars(title: str, values: dict[str, float | None], unit: str) -> str | None:
    """One bar per strategy for one cost (seconds, MB, parameters). None if all missing."""
    items = [(k, v) for k, v in values.items() if v is not None and math.isfinite(v)]
    if not items:
        return None
    fig = Figure(figsize=(4.0, 2.6))
    ax = fig.add_subplot()
    ax.bar([k for k, _ in items], [v for _, v in items], color="#4c72b0")
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return to_data_uri(fig)
