"""Evaluation metrics for image aesthetics assessment, with the long-tail views of ELTA.

Correlations (PLCC, SRCC, KRCC), errors on the MOS (MAE, MSE, RMSE), binary accuracy, EMD between rating
distributions, and the long-tail breakdowns: MAE per ground-truth percentile bucket (the paper's LL / LM / LH),
balanced MAE over equal-width score bins, regression-to-the-mean diagnostics (bias, spread) and MAE on minority
versus majority groups (ELTA 2.0's SN / SJ). Pure numpy / scipy; every function takes array-likes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = [
    "OVERALL_ROWS",
    "TAIL_ROWS",
    "as_pair",
    "as_scores",
    "balanced_mae",
    "correlations",
    "emd",
    "evaluate",
    "format_metrics",
    "format_table",
    "format_value",
    "minority_groups",
    "tail_buckets",
]

BUCKETS = ("low", "medium", "high")
_CORRELATIONS = {"plcc": stats.pearsonr, "srcc": stats.spearmanr, "krcc": stats.kendalltau}


def as_scores(x, name: str) -> np.ndarray:
    """``x`` as a finite 1-D float64 array, or a ValueError naming ``name``."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(
            f"{name}: {bad.size} non-finite value(s) out of {arr.size} (first at index {bad[0]}: {arr[bad[0]]})"
        )
    return arr


def as_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(pred, gt)``: finite, 1-D, equal and non-zero length."""
    p, g = as_scores(pred, "pred"), as_scores(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred has {p.size} values but gt has {g.size}")
    if p.size == 0:
        raise ValueError("no samples to evaluate (pred and gt are empty)")
    return p, g


def _mean_or_nan(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else math.nan


def correlations(pred, gt) -> dict[str, float]:
    """PLCC, SRCC and KRCC (scipy pearsonr / spearmanr / kendalltau-b) of ``pred`` against ``gt``.

    pred, gt: [N] scores. A coefficient is NaN when N < 2 or either input is constant.
    """
    p, g = as_pair(pred, gt)
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(g) == 0:
        return dict.fromkeys(_CORRELATIONS, math.nan)
    return {name: float(test(p, g).statistic) for name, test in _CORRELATIONS.items()}


def tail_buckets(gt) -> np.ndarray:
    """Long-tail bucket of each sample by its ground-truth percentile: ``"low"``, ``"medium"`` or ``"high"``.

    gt: [N] ground-truth MOS. Low is ``gt <= p20``, high is ``gt >= p80`` (``np.percentile``, linear
    interpolation), medium the rest; a sample equal to both cuts (p20 == p80) is low. Returns [N] strings.
    """
    g = as_scores(gt, "gt")
    if g.size == 0:
        raise ValueError("gt is empty")
    p20, p80 = np.percentile(g, [20, 80])
    return np.where(g <= p20, "low", np.where(g >= p80, "high", "medium"))


def balanced_mae(pred, gt, score_range: tuple[float, float] | None, num_bins: int | None = None) -> float:
    """Mean over equal-width ground-truth bins of each non-empty bin's MAE.

    pred, gt: [N] scores. ``score_range`` (lo, hi) is split into ``num_bins`` equal bins (default 18: 0.5 wide
    on AVA's 1..10 scale); None uses [min(gt), max(gt)]. A bin holds [left, right); the top edge belongs to the
    last bin and values outside the range fall into the end bins.
    """
    p, g = as_pair(pred, gt)
    num_bins = 18 if num_bins is None else int(num_bins)
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if score_range is None:
        lo, hi = float(g.min()), float(g.max())
    else:
        lo, hi = (float(v) for v in score_range)
        if not hi > lo:
            raise ValueError(f"score_range must be (low, high) with low < high, got {score_range}")
    inner_edges = np.linspace(lo, hi, num_bins + 1)[1:-1]
    bins = np.searchsorted(inner_edges, g, side="right")
    per_bin = np.bincount(bins, weights=np.abs(p - g), minlength=num_bins)
    counts = np.bincount(bins, minlength=num_bins)
    filled = counts > 0
    return float(np.mean(per_bin[filled] / counts[filled]))


def emd(pred_dist, gt_dist, r: float = 2.0) -> float:
    """Earth mover's distance between rating distributions (NIMA's definition), averaged over samples.

    pred_dist, gt_dist: [N, K] non-negative weights over K ordered bins; each row is normalised to sum 1, so
    vote counts work as well as probabilities. Per sample ``(mean_k |CDF_pred(k) - CDF_gt(k)|^r)^(1/r)``.
    """
    p, q = (np.asarray(d, dtype=np.float64) for d in (pred_dist, gt_dist))
    if p.ndim != 2 or p.shape != q.shape:
        raise ValueError(f"pred_dist {p.shape} and gt_dist {q.shape} must both be [N, K] with the same shape")
    if p.shape[0] == 0:
        raise ValueError("no samples to evaluate (distributions are empty)")
    for name, d in (("pred_dist", p), ("gt_dist", q)):
        bad = np.flatnonzero(~(np.isfinite(d).all(axis=1) & (d >= 0).all(axis=1) & (d.sum(axis=1) > 0)))
        if bad.size:
            raise ValueError(
                f"{name}: {bad.size} row(s) not a distribution (non-finite, negative or all zero), "
                f"first at row {bad[0]}"
            )
    p, q = (d / d.sum(axis=1, keepdims=True) for d in (p, q))
    cdf_diff = np.abs(np.cumsum(p, axis=1) - np.cumsum(q, axis=1))
    return float(np.mean(np.mean(cdf_diff**r, axis=1) ** (1.0 / r)))


def minority_groups(group_counts: dict[str, int], ratio: float = 0.2) -> set[str]:
    """Groups whose (training) count is under ``ratio`` x the largest group's count.

    The empty name ``""`` means "no group" and is never a group. Returns an empty set for no groups.
    """
    counts = {str(k): int(v) for k, v in group_counts.items() if str(k) != ""}
    largest = max(counts.values(), default=0)
    return {k for k, v in counts.items() if v < ratio * largest}


def evaluate(
    pred,
    gt,
    *,
    pred_dist=None,
    gt_dist=None,
    threshold: float | None = None,
    score_range: tuple[float, float] | None = None,
    groups=None,
    group_counts: dict[str, int] | None = None,
    minority_ratio: float = 0.2,
) -> dict[str, float]:
    """All metrics of predicted against ground-truth MOS, as plain Python numbers.

    pred, gt: [N] MOS on the dataset's scale. ``threshold`` splits good from bad for ``acc`` (AVA: 5); None
    uses the midpoint of ``score_range`` (lo, hi), which also sets the bins of ``bmae``. ``pred_dist``,
    ``gt_dist``: [N, K] distributions, adds ``emd`` when both are given. ``groups``: [N] group names (ints
    are compared as strings) with ``group_counts`` the TRAINING count of each group: adds ``mae_minority``,
    ``mae_majority``, ``n_minority``, ``n_majority``; samples with no group or a group absent from
    ``group_counts`` count as neither. An empty bucket or group gives NaN.
    """
    p, g = as_pair(pred, gt)
    if threshold is None:
        if score_range is None:
            raise ValueError("acc needs a threshold or a score_range (threshold = its midpoint); got neither")
        threshold = (float(score_range[0]) + float(score_range[1])) / 2.0
    err = p - g
    mse = float(np.mean(err**2))
    out: dict[str, float] = {"n": int(p.size), **correlations(p, g)}
    out.update(mae=float(np.mean(np.abs(err))), mse=mse, rmse=math.sqrt(mse))
    out["acc"] = float(np.mean((p >= threshold) == (g >= threshold)))
    buckets = tail_buckets(g)
    for b in BUCKETS:
        out[f"mae_{b}"] = _mean_or_nan(np.abs(err[buckets == b]))
    out["bmae"] = balanced_mae(p, g, score_range)
    out["bias_low"] = _mean_or_nan(err[buckets == "low"])
    out["bias_high"] = _mean_or_nan(err[buckets == "high"])
    out["spread"] = float(p.std() / g.std()) if np.ptp(g) > 0 else math.nan
    if pred_dist is not None and gt_dist is not None:
        if len(pred_dist) != p.size:
            raise ValueError(f"pred_dist has {len(pred_dist)} rows but there are {p.size} samples")
        out["emd"] = emd(pred_dist, gt_dist)
    if groups is not None:
        if group_counts is None:
            raise ValueError("groups needs group_counts (the training count of each group)")
        values = np.asarray(groups).tolist()  # group names as strings; None / NaN: no group ("")
        names = ["" if g is None or (isinstance(g, float) and math.isnan(g)) else str(g) for g in values]
        if len(names) != p.size:
            raise ValueError(f"groups has {len(names)} values but there are {p.size} samples")
        minority = minority_groups(group_counts, minority_ratio)
        majority = {str(k) for k in group_counts} - {""} - minority
        is_min, is_maj = (np.array([s in part for s in names], dtype=bool) for part in (minority, majority))
        out.update(
            mae_minority=_mean_or_nan(np.abs(err[is_min])), mae_majority=_mean_or_nan(np.abs(err[is_maj]))
        )
        out.update(n_minority=int(is_min.sum()), n_majority=int(is_maj.sum()))
    return out


# (metric key, label) of the overall and the tail block of a metrics table
OVERALL_ROWS: Sequence[tuple[str, str]] = (
    *(("n", "n"), ("plcc", "PLCC"), ("srcc", "SRCC"), ("krcc", "KRCC"), ("acc", "acc")),
    *(("mae", "MAE"), ("rmse", "RMSE"), ("emd", "EMD"), ("bmae", "bMAE")),
)
TAIL_ROWS: Sequence[tuple[str, str]] = (
    *(("mae_low", "MAE low"), ("mae_medium", "MAE medium"), ("mae_high", "MAE high")),
    *(("bias_low", "bias low"), ("bias_high", "bias high"), ("spread", "spread")),
    *(("mae_minority", "MAE minority"), ("mae_majority", "MAE majority")),
)


def format_value(key: str, value) -> str:
    """A metric as printed in the tables: counts as integers, the rest with four decimals."""
    if key == "n" or (isinstance(value, (int, np.integer)) and not isinstance(value, bool)):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "nan"
    return f"{value:+.4f}" if key.startswith("bias") else f"{value:.4f}"


def format_table(header: Sequence[str], rows: list, tail: list, title: str | None = None) -> str:
    """Rows of text cells as an aligned plain-text table: the first column left-aligned, the others right.

    Under ``title`` (if any): the header, a rule, ``rows``, then ``tail`` under a "long tail" line (if any).
    """
    widths = [max(len(row[i]) for row in [header, *rows, *tail]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        label, *values = row
        values = [f"{v:>{w}}" for v, w in zip(values, widths[1:], strict=True)]
        return "  ".join([f"{label:<{widths[0]}}", *values]).rstrip()

    lines = [title] if title else []
    lines += [line(header), "-" * (sum(widths) + 2 * (len(widths) - 1)), *(line(row) for row in rows)]
    if tail:
        lines.append("long tail")
        lines += [line(row) for row in tail]
    return "\n".join(lines)


def format_metrics(metrics: dict, title: str | None = None) -> str:
    """``metrics`` (from :func:`evaluate`) as an aligned two-column plain-text table.

    Overall metrics first, then a "long tail" block; keys absent from ``metrics`` are skipped.
    """
    rows = [(label, format_value(k, metrics[k])) for k, label in OVERALL_ROWS if k in metrics]
    tail: list[tuple[str, str]] = []
    for key, label in TAIL_ROWS:
        if key in metrics:
            count_key = "n_" + key.removeprefix("mae_")
            if count_key in metrics:
                label = f"{label} (n={int(metrics[count_key])})"
            tail.append((label, format_value(key, metrics[key])))
    return format_table(("metric", "value"), rows, tail, title)
