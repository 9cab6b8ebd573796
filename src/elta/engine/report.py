"""A one-page PNG report of predictions against ground truth: distributions, agreement, long-tail errors.

Drawn with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``), so it neither needs a display nor
changes pyplot's global backend or state for other code in the process.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from elta.metrics import BUCKETS, correlations, tail_buckets
from elta.utils import atomic_write

__all__ = ["draw_report"]


def draw_report(
    pred,
    gt,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    score_range: tuple[float, float] | None = None,
) -> Path:
    """Write a three-panel PNG comparing predicted and ground-truth MOS; returns its path.

    pred, gt: [N] MOS on the dataset's scale. Panels: (1) overlaid histograms of GT and predicted MOS on the
    same bins, (2) predicted vs GT scatter with the y = x line and PLCC / SRCC in the title, (3) MAE per GT
    bucket (low / medium / high, :func:`elta.metrics.tail_buckets`) with each bucket's mean bias (pred - gt)
    on its bar. ``score_range`` (lo, hi) fixes the axes; None uses the data's range. The file is written
    atomically; missing folders are created.
    """
    corr = correlations(pred, gt)  # validates pred and gt
    p, g = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    both = np.concatenate([p, g])
    lo, hi = (float(v) for v in (score_range if score_range is not None else (both.min(), both.max())))
    if not hi > lo:  # constant data: widen so the axes have a size
        lo, hi = lo - 0.5, hi + 0.5

    fig = Figure(figsize=(15, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_hist, ax_scatter, ax_bar = fig.subplots(1, 3)

    bins = np.linspace(lo, hi, 31)
    ax_hist.hist(np.clip(g, lo, hi), bins=bins, alpha=0.5, label="ground truth", color="tab:blue")
    ax_hist.hist(np.clip(p, lo, hi), bins=bins, alpha=0.5, label="predicted", color="tab:orange")
    ax_hist.set(xlabel="MOS", ylabel="images", title="MOS distribution")
    ax_hist.legend()

    ax_scatter.scatter(g, p, s=6, alpha=0.4, color="tab:blue", edgecolors="none", rasterized=True)
    ax_scatter.plot([lo, hi], [lo, hi], color="black", linewidth=1, linestyle="--", label="y = x")
    agreement = f"PLCC {corr['plcc']:.3f}   SRCC {corr['srcc']:.3f}   (n={p.size})"
    ax_scatter.set(
        xlim=(lo, hi), ylim=(lo, hi), xlabel="ground-truth MOS", ylabel="predicted MOS", title=agreement
    )
    ax_scatter.set_aspect("equal")
    ax_scatter.legend(loc="upper left")

    buckets = tail_buckets(g)
    err = p - g
    maes, biases, labels = [], [], []
    for b in BUCKETS:
        e = err[buckets == b]
        maes.append(float(np.abs(e).mean()) if e.size else 0.0)
        biases.append(f"bias {e.mean():+.3f}" if e.size else "empty")
        labels.append(f"{b}\n(n={e.size})")
    bars = ax_bar.bar(labels, maes, color=["tab:red", "tab:gray", "tab:green"])
    ax_bar.bar_label(bars, labels=biases, padding=3)
    ax_bar.margins(y=0.15)
    ax_bar.set(ylabel="MAE", title="MAE per GT bucket (<= p20, middle, >= p80)")

    if title:
        fig.suptitle(title)

    return atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
