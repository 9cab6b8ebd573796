"""Post-hoc monotone calibration of predicted MOS against the long-tail regression to the mean.

A model trained on long-tailed labels predicts too close to the mean: ``spread = sd(pred) / sd(gt) < 1``,
positive bias on low-scored images and negative bias on high-scored ones. A strictly increasing map from
predicted to ground-truth MOS, fitted on validation predictions, stretches the predictions back out and leaves
their ranking, hence SRCC and KRCC, unchanged.

Three maps (:data:`METHODS`, see :func:`fit_calibration`): ``affine``, ``quantile`` and ``isotonic``, the
centred isotonic regression of Oron & Flournoy ("Centered isotonic regression", Statistics in
Biopharmaceutical Research, 2017).

Every output is clipped to ``score_range``. That clip is the only place where two distinct predictions can
get the same calibrated score (both land at or beyond the same bound); inside the range every map is strictly
increasing (up to float64 rounding of inputs closer than about 1e-12 of the score scale).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from elta.errors import CalibrationError
from elta.metrics import (
    OVERALL_ROWS,
    TAIL_ROWS,
    as_pair,
    as_scores,
    balanced_mae,
    evaluate,
    format_table,
    format_value,
    tail_buckets,
)

__all__ = [
    "METHODS",
    "OBJECTIVES",
    "Calibration",
    "Selection",
    "calibration_report",
    "fit_calibration",
    "select_calibration",
    "calibrated_scores",
    "choose_calibration",
    "format_calibration_report",
    "format_selection",
    "tail_objective",
]

METHODS = ("affine", "quantile", "isotonic")

# Quantile knots of the prediction distribution (every 1 %); fewer predictions than this keep them all.
_QUANTILE_KNOTS = 101
# Weight of the straight line blended into tied quantile targets to make them strictly increasing.
_TIE_BREAK = 1e-6
# Rows of the report that calibration is meant to move (and SRCC, which must not move).
_HIGHLIGHT = {"srcc", "mae_low", "mae_medium", "mae_high", "bias_low", "bias_high", "spread"}


def _check_range(score_range) -> tuple[float, float]:
    lo, hi = (float(v) for v in score_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"score_range must be (low, high) with low < high, got {tuple(score_range)}")
    return lo, hi


def _piecewise(pred: np.ndarray, xk: np.ndarray, yk: np.ndarray) -> np.ndarray:
    """Linear interpolation through the knots; beyond the end knots, lines with the chord slope of all knots.

    The chord slope ``(y[-1] - y[0]) / (x[-1] - x[0])`` is the stretch the whole fit found; the end segments'
    own slopes rest on a few tail samples and can be near zero (flat tails) or very steep.
    """
    slope = (yk[-1] - yk[0]) / (xk[-1] - xk[0])
    out = np.interp(pred, xk, yk)
    out = np.where(pred < xk[0], yk[0] + slope * (pred - xk[0]), out)
    return np.where(pred > xk[-1], yk[-1] + slope * (pred - xk[-1]), out)


@dataclass
class Calibration:
    """A fitted monotone map from predicted to ground-truth MOS.

    method: one of :data:`METHODS`. params: ``{"a", "b"}`` (affine: ``a * pred + b``) or ``{"x", "y"}``
    (quantile, isotonic: strictly increasing knots, prediction -> calibrated score). score_range: (lo, hi)
    every output is clipped to. n_fit: number of validation samples the map was fitted on.
    """

    method: str
    params: dict[str, list[float] | float]
    score_range: tuple[float, float]
    n_fit: int

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; choose one of {METHODS}")
        self.score_range = _check_range(self.score_range)
        self.n_fit = int(self.n_fit)
        missing = ({"a", "b"} if self.method == "affine" else {"x", "y"}) - set(self.params)
        if missing:
            raise ValueError(f"{self.method} calibration is missing params {sorted(missing)}")
        if self.method == "affine":
            a, b = float(self.params["a"]), float(self.params["b"])
            if not (math.isfinite(a) and math.isfinite(b) and a > 0):
                raise ValueError(
                    f"affine calibration needs a finite slope a > 0 and finite b, got a={a}, b={b}"
                )
            self.params = {"a": a, "b": b}
        else:
            xk, yk = (np.asarray(self.params[k], dtype=np.float64) for k in ("x", "y"))
            if xk.ndim != 1 or xk.shape != yk.shape or xk.size < 2:
                what = f"params x and y of equal length >= 2, got {xk.size}, {yk.size}"
                raise ValueError(f"{self.method} calibration needs {what}")
            if not all(np.isfinite(k).all() and (np.diff(k) > 0).all() for k in (xk, yk)):
                raise ValueError(
                    f"{self.method} calibration knots x and y must be finite and strictly increasing"
                )
            self.params = {"x": xk.tolist(), "y": yk.tolist()}

    def apply(self, pred) -> np.ndarray:
        """Calibrated scores of ``pred``: any array-like of predicted MOS (a CPU torch tensor works through
        ``np.asarray``). Returns a float64 numpy array of the same shape, clipped to ``score_range``; NaN stays NaN.
        """
        p = np.asarray(pred, dtype=np.float64)
        if self.method == "affine":
            out = self.params["a"] * p + self.params["b"]
        else:
            out = _piecewise(p, np.asarray(self.params["x"]), np.asarray(self.params["y"]))
        return np.clip(out, *self.score_range)

    def to_dict(self) -> dict:
        """Plain-Python form (str, int, float, lists), safe for ``torch.load(weights_only=True)``."""
        return asdict(self) | {"score_range": list(self.score_range)}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """Inverse of :meth:`to_dict`; validates the method and its params."""
        missing = {"method", "params", "score_range", "n_fit"} - set(d)
        if missing:
            raise ValueError(f"calibration dict is missing keys {sorted(missing)}")
        return cls(str(d["method"]), dict(d["params"]), tuple(d["score_range"]), int(d["n_fit"]))


def _fit_affine(p: np.ndarray, g: np.ndarray) -> dict[str, float]:
    # Matching mean and sd, not least squares: the least-squares slope r * sd(gt) / sd(pred) leaves the
    # predictions' sd at r * sd(gt), i.e. keeps regressing to the mean whenever the correlation r < 1.
    if np.ptp(g) == 0:
        raise CalibrationError(
            "gt is constant: an affine map onto it would have slope 0 and erase the ranking"
        )
    a = float(g.std() / p.std())
    return {"a": a, "b": float(g.mean() - a * p.mean())}


def _fit_quantile(p: np.ndarray, train_gt: np.ndarray) -> dict[str, list[float]]:
    if np.ptp(train_gt) == 0:
        raise CalibrationError("train_gt is constant: its quantiles cannot give a strictly increasing map")
    probs = np.linspace(0.0, 1.0, min(p.size, _QUANTILE_KNOTS))
    x = np.sort(p) if p.size <= _QUANTILE_KNOTS else np.quantile(p, probs)
    y = np.quantile(train_gt, probs)
    # Tied prediction knots become one knot at the mean of their targets.
    x, inverse = np.unique(x, return_inverse=True)
    y = np.bincount(inverse, weights=y) / np.bincount(inverse)
    # Tied targets (repeated training labels) get a tiny share of the straight line from first to last,
    # which makes them strictly increasing without leaving [y[0], y[-1]].
    y = (1.0 - _TIE_BREAK) * y + _TIE_BREAK * np.linspace(y[0], y[-1], y.size)
    return {"x": x.tolist(), "y": y.tolist()}


def _pav(y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted pool-adjacent-violators on ``y`` in its given order.

    Returns ``(value, weight, size)`` of each block, values strictly increasing (equal neighbours are pooled
    too). ``size`` counts the entries of ``y`` in the block, in order.
    """
    values, weights, sizes = [], [], []
    for v, wt in zip(y.tolist(), w.tolist(), strict=True):
        size = 1
        while values and values[-1] >= v:
            pv, pw = values.pop(), weights.pop()
            v = (pv * pw + v * wt) / (pw + wt)
            wt += pw
            size += sizes.pop()
        values.append(v)
        weights.append(wt)
        sizes.append(size)
    return np.array(values), np.array(weights), np.array(sizes)


def _fit_isotonic(p: np.ndarray, g: np.ndarray) -> dict[str, list[float]]:
    # Tied predictions first become one point at the mean of their gt, so the fit is a function of pred.
    x, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    y = np.bincount(inverse, weights=g) / counts
    values, weights, sizes = _pav(y, counts.astype(np.float64))
    if values.size < 2:
        raise CalibrationError(
            "isotonic fit is a single flat block (gt does not increase with pred on these samples); "
            "check the predictions or use method='affine'"
        )
    ends = np.cumsum(sizes)
    starts = ends - sizes
    centres = np.add.reduceat(x * counts, starts) / weights
    # Each centre stays inside its block's x interval, so the centres are strictly increasing despite rounding.
    centres = np.clip(centres, x[starts], x[ends - 1])
    return {"x": centres.tolist(), "y": values.tolist()}


def fit_calibration(
    pred, gt, method: str = "affine", *, score_range: tuple[float, float], train_gt=None
) -> Calibration:
    """Fit a strictly increasing map from ``pred`` to ``gt`` (validation predictions and labels, [N] MOS).

    - ``affine``: ``a * pred + b`` with ``a = sd(gt) / sd(pred)``, ``b = mean(gt) - a * mean(pred)``, so the
      calibrated validation predictions have gt's mean and sd (spread 1). Linear everywhere.
    - ``quantile``: ``F_train^-1(F_pred(pred))``: knots at the 101 quantiles of ``pred`` (all sorted values when
      N <= 101) mapped to the same quantiles of ``train_gt`` (the TRAINING labels, required); ``gt`` only
      sets ``n_fit`` and is validated. Piecewise linear; tied targets are made strictly increasing by a
      1e-6 blend with a straight line. Spread ends near sd(train_gt) / sd(gt).
    - ``isotonic``: pool-adjacent-violators fit of gt on pred, knots at (x-centre, mean gt) of each block,
      linear in between: strictly increasing where plain isotonic regression has flat steps. It estimates
      E[gt | pred], so it undoes non-linear compression but, like least squares, keeps a shrinkage of about
      the correlation r: spread rises toward r, not to 1.

    Quantile and isotonic continue beyond their first and last knots linearly, with the chord slope
    (last - first knot), so predictions outside the fitted range keep their order. All outputs are clipped
    to ``score_range`` (lo, hi). Raises :class:`~elta.errors.CalibrationError` when the data allow no
    strictly increasing map (constant predictions, constant gt / train_gt, a single isotonic block) and
    ValueError for an unknown method or quantile without ``train_gt``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    lo_hi = _check_range(score_range)
    p, g = as_pair(pred, gt)
    if p.size < 2:
        raise CalibrationError(f"{p.size} prediction(s): a calibration map needs at least 2 to fit")
    if np.ptp(p) == 0:
        raise CalibrationError(
            f"predictions are constant ({p.size} samples, all {p[0]:g}): no increasing map can spread them"
        )
    if method == "quantile" and train_gt is None:
        raise ValueError("method='quantile' needs train_gt (the training labels it maps predictions onto)")
    if method == "quantile":
        params = _fit_quantile(p, as_scores(train_gt, "train_gt"))
    else:
        params = _fit_affine(p, g) if method == "affine" else _fit_isotonic(p, g)
    return Calibration(method, params, lo_hi, p.size)


def calibration_report(pred, gt, cal: Calibration, **evaluate_kwargs) -> dict[str, dict[str, float]]:
    """``{"before": evaluate(pred, gt), "after": evaluate(cal.apply(pred), gt)}`` (see :func:`elta.metrics.evaluate`).

    ``evaluate_kwargs`` go to both calls; ``score_range`` defaults to the calibration's.
    """
    evaluate_kwargs.setdefault("score_range", cal.score_range)
    p, g = as_pair(pred, gt)
    before, after = (evaluate(values, g, **evaluate_kwargs) for values in (p, cal.apply(p)))
    return {"before": before, "after": after}


def _change(key: str, before, after) -> str:
    before, after = float(before), float(after)
    if key == "n" or math.isnan(before) or math.isnan(after):
        return ""
    if key == "srcc" and before == after:
        return "same"
    delta = after - before
    return f"{0.0 if abs(delta) < 5e-5 else delta:+.4f}"  # no "-0.0000" for rounding noise


def format_calibration_report(report: dict, title: str | None = None) -> str:
    """``report`` (from :func:`calibration_report`) as an aligned plain-text table: metric, before, after, change.

    Rows marked ``*`` are the ones calibration should move (tail MAE, bias, spread) or keep (SRCC reads
    ``same`` when unchanged).
    """
    before, after = report["before"], report["after"]

    def cells(key: str, label: str) -> tuple[str, str, str, str]:
        mark = "* " if key in _HIGHLIGHT else "  "
        b, a = before[key], after[key]
        return mark + label, format_value(key, b), format_value(key, a), _change(key, b, a)

    rows, tail = (
        [cells(k, label) for k, label in table if k in before and k in after]
        for table in (OVERALL_ROWS, TAIL_ROWS)
    )
    table = format_table(("metric", "before", "after", "change"), rows, tail, title)
    return table + "\n* moved by calibration (SRCC must stay the same)"


def calibrated_scores(spec, scores: np.ndarray) -> np.ndarray:
    """``scores`` through the calibration map stored in a model spec (unchanged when it has none)."""
    if not getattr(spec, "calibration", None):
        return scores
    return Calibration.from_dict(spec.calibration).apply(scores)


# ------------------------------------------------------------------------------------ choosing a map for the tails

OBJECTIVES = ("tail", "bmae")
# Blends of the affine map with the identity, pred + λ (affine(pred) − pred): shrink (λ < 1) to stretch (λ > 1).
_BLENDS = (0.25, 0.5, 0.75, 1.0, 1.25)
_FOLDS = 5


def tail_objective(pred, gt, objective: str = "tail", *, score_range=None, buckets=None) -> float:
    """What ``select_calibration`` minimises: ``tail`` — the mean of the low- and high-bucket MAE (buckets of
    :func:`elta.metrics.tail_buckets`, by default those of ``gt`` itself) — or ``bmae``, the balanced MAE."""
    p, g = as_pair(pred, gt)
    if objective == "bmae":
        return balanced_mae(p, g, score_range)
    if objective != "tail":
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    buckets = tail_buckets(g) if buckets is None else buckets
    return float(np.mean([np.abs(p - g)[buckets == b].mean() for b in ("low", "high")]))


@dataclass
class Selection:
    """The map ``select_calibration`` chose (None: the identity, no map) and why.

    cross_validated: each candidate's objective on out-of-fold predictions (lower is better); before / after:
    the objective of the validation rows without and with the chosen map (after <= before always holds).
    """

    calibration: Calibration | None
    chosen: str
    objective: str
    cross_validated: dict[str, float] = field(default_factory=dict)
    before: float = math.nan
    after: float = math.nan

    def record(self) -> dict:
        """Plain-Python summary stored beside the map in a checkpoint."""
        return {
            "chosen": self.chosen,
            "objective": self.objective,
            "cross_validated": {k: float(v) for k, v in self.cross_validated.items()},
            "validation": {"before": float(self.before), "after": float(self.after)},
        }


def _candidates(p, g, score_range, train_gt) -> dict[str, Calibration | None]:
    """Every map of the auto search fitted on (p, g); a map the data do not allow is left out."""
    fitted: dict[str, Calibration] = {}
    for method in METHODS:
        if method == "quantile" and train_gt is None:
            continue
        with contextlib.suppress(CalibrationError):
            fitted[method] = fit_calibration(p, g, method, score_range=score_range, train_gt=train_gt)
    found: dict[str, Calibration | None] = {"identity": None}
    if "affine" in fitted:
        affine = fitted.pop("affine")
        a, b = affine.params["a"], affine.params["b"]
        for lam in _BLENDS:
            slope = 1.0 + lam * (a - 1.0)
            if slope > 0:
                params = {"a": slope, "b": lam * b}
                found[f"affine λ={lam:g}"] = Calibration("affine", params, score_range, p.size)
    return found | fitted


def select_calibration(
    pred, gt, *, score_range: tuple[float, float], train_gt=None, objective: str = "tail", seed: int = 0
) -> Selection:
    """Choose the map that best serves the tails, never one worse than none on the validation rows.

    Candidates: the identity, the affine map blended with the identity (λ = 0.25 … 1.25: shrink to stretch),
    quantile (with ``train_gt``) and isotonic. Each is scored by 5-fold cross-validation on (pred, gt): fitted
    on four folds, applied to the fifth, the ``objective`` (:func:`tail_objective`, buckets of the whole
    ``gt``) computed on all out-of-fold predictions — so a map that only fits noise is not chosen. The winner
    is refitted on all rows; if it then does worse than the identity on those rows, the identity is kept. Every
    candidate is increasing, so SRCC is unchanged (up to ties at the clip bounds).
    """
    p, g = as_pair(pred, gt)
    lo_hi = _check_range(score_range)
    buckets = tail_buckets(g)
    score = lambda values, rows=slice(None): tail_objective(  # noqa: E731
        values, g[rows], objective, score_range=lo_hi, buckets=buckets[rows]
    )
    fitted = _candidates(p, g, lo_hi, train_gt)
    if p.size < 2 * _FOLDS:  # too few rows to hold any out: choose on the rows themselves
        cv = {name: score(p if cal is None else cal.apply(p)) for name, cal in fitted.items()}
    else:
        folds = np.random.default_rng(seed).permutation(p.size) % _FOLDS
        out_of_fold: dict[str, np.ndarray] = {}
        for k in range(_FOLDS):
            held = folds == k
            for name, cal in _candidates(p[~held], g[~held], lo_hi, train_gt).items():
                column = out_of_fold.setdefault(name, np.full(p.size, np.nan))
                column[held] = p[held] if cal is None else cal.apply(p[held])
        cv = {name: score(v) for name, v in out_of_fold.items() if np.isfinite(v).all()}
    chosen = min(cv, key=lambda name: (cv[name], name != "identity"))  # ties go to the identity
    cal = fitted.get(chosen)
    before = score(p)
    after = before if cal is None else score(cal.apply(p))
    if after > before:
        chosen, cal, after = "identity", None, before
    return Selection(cal, chosen, objective, cv, before, after)


def choose_calibration(
    pred,
    gt,
    method: str = "auto",
    *,
    score_range: tuple[float, float],
    train_gt=None,
    objective: str = "tail",
) -> Selection:
    """``method`` auto: :func:`select_calibration`; otherwise that one map (:func:`fit_calibration`), with the
    ``objective`` before and after on (pred, gt) recorded as for auto."""
    if method == "auto":
        return select_calibration(pred, gt, score_range=score_range, train_gt=train_gt, objective=objective)
    cal = fit_calibration(pred, gt, method, score_range=score_range, train_gt=train_gt)
    before = tail_objective(pred, gt, objective, score_range=score_range)
    after = tail_objective(cal.apply(pred), gt, objective, score_range=score_range)
    return Selection(cal, method, objective, before=before, after=after)


def format_selection(selection: Selection) -> str:
    """The candidates' cross-validated objective, best first, the chosen one marked."""
    name = {"tail": "mean of low- and high-bucket MAE", "bmae": "balanced MAE"}[selection.objective]
    lines = [f"candidates, by cross-validated {name} on the validation split:"]
    for cand, value in sorted(selection.cross_validated.items(), key=lambda kv: kv[1]):
        mark = "→" if cand == selection.chosen else " "
        lines.append(f" {mark} {cand:<14} {value:.4f}")
    lines.append(
        f"chosen: {selection.chosen} ({name} on the validation rows {selection.before:.4f} → "
        f"{selection.after:.4f})"
    )
    return "\n".join(lines)
