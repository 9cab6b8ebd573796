"""Evaluation of a checkpoint on a dataset split: metrics.json, predictions.csv, report.png."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from elta.config import RunConfig
from elta.data.cache import check_cache_fits
from elta.data.dataset import dist_columns
from elta.engine.predictor import Predictions, Predictor
from elta.engine.prepare import read_dataset
from elta.engine.report import draw_report
from elta.engine.runtime import Runtime
from elta.errors import ConfigError, ImageLoadError
from elta.metrics import evaluate
from elta.models.checkpoint import Checkpoint, load_checkpoint
from elta.models.model import ModelSpec
from elta.utils import atomic_write_text

__all__ = ["evaluate_checkpoint", "select_split", "check_readable", "score_metrics", "write_evaluation"]

log = logging.getLogger(__name__)


def select_split(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of ``split`` (train | val | test | all); an empty selection is an error naming what exists."""
    chosen = df if split == "all" else df[df["split"] == split]
    if chosen.empty:
        counts = df["split"].replace("", "(none)").value_counts().to_dict()
        raise ConfigError(
            f"no rows in split '{split}' (splits here: {counts}); choose --split with one of them or all"
        )
    return chosen.reset_index(drop=True)


def check_readable(preds: Predictions, where: str) -> None:
    """Raise :class:`~elta.errors.ImageLoadError` naming ``where`` (e.g. ``split 'test' of data.csv``) when
    not one of its images could be read."""
    if not preds.ok.any():
        first = preds.errors[0] if preds.errors else "no images"
        raise ImageLoadError(where, f"none of the {len(preds.errors)} images could be read (first: {first})")


def score_metrics(
    frame: pd.DataFrame, preds: Predictions, spec: ModelSpec, where: str = "the dataset"
) -> dict:
    """The metrics of SPEC.md for predictions on ``frame`` (rows whose image failed are left out).

    ``where`` names the rows in the error raised when none of their images could be read."""
    check_readable(preds, where)
    ok = preds.ok
    cols = dist_columns(frame)
    gt = frame["mos"].to_numpy(dtype=np.float64)
    groups = frame["group"].astype(str).to_numpy()
    dists = {}
    if preds.dist is not None and cols:
        dists = {"pred_dist": preds.dist[ok], "gt_dist": frame[cols].to_numpy(dtype=np.float64)[ok]}
    use_groups = spec.group_counts and (groups != "").any()
    grouped = {"groups": groups[ok], "group_counts": spec.group_counts} if use_groups else {}
    scale = {"threshold": spec.acc_threshold, "score_range": tuple(spec.score_range)}
    metrics = evaluate(preds.score[ok], gt[ok], **scale, **dists, **grouped)
    metrics["skipped"] = int((~ok).sum())
    return metrics


def write_evaluation(
    out: Path, frame: pd.DataFrame, preds: Predictions, spec: ModelSpec, metrics: dict, title: str
) -> None:
    """metrics.json, predictions.csv (image_id, gt, pred, pred_std[, pred_uncalibrated], p1..pK, group, error)
    and report.png."""
    gt = frame["mos"].to_numpy(dtype=np.float64)
    groups = frame["group"].astype(str).to_numpy()
    table = pd.DataFrame(
        {"image_id": frame["image_id"], "gt": gt, "pred": preds.score, "pred_std": preds.std}
    )
    if preds.uncalibrated is not None:  # pred went through a calibration map
        table["pred_uncalibrated"] = preds.uncalibrated
    if preds.dist is not None:
        table[[f"p{k + 1}" for k in range(preds.dist.shape[1])]] = preds.dist
    if (groups != "").any():
        table["group"] = groups
    table["error"] = preds.errors
    out.mkdir(parents=True, exist_ok=True)
    # floats as repr writes them (they read back exactly), so the file reproduces metrics.json
    atomic_write_text(out / "predictions.csv", table.to_csv(index=False))
    atomic_write_text(out / "metrics.json", json.dumps(_json_safe(metrics), indent=2))
    ok = preds.ok
    draw_report(preds.score[ok], gt[ok], out / "report.png", title=title, score_range=tuple(spec.score_range))
    if metrics.get("skipped"):
        where = out / "predictions.csv"
        log.warning("%d images could not be read; their reasons are in %s", metrics["skipped"], where)


def evaluate_checkpoint(
    checkpoint: Checkpoint | str | Path,
    cfg: RunConfig,
    out: str | Path,
    runtime: Runtime | None = None,
    *,
    split: str = "test",
    calibrated: bool = True,
) -> dict:
    """Score ``split`` of the dataset in ``cfg.data`` and write the evaluation files into ``out``.

    Returns the metrics dict (plus ``skipped``: images that could not be read, listed in predictions.csv).
    With a calibration map in the checkpoint (and ``calibrated``), the metrics are those of the calibrated
    scores and ``before_calibration`` holds the model's own.
    """
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(checkpoint)
    predictor = Predictor.from_checkpoint(checkpoint, runtime, calibrated=calibrated)
    spec = predictor.spec
    annotations = read_dataset(cfg)
    if annotations.problems:
        log.warning("%d annotation rows could not be used (see `elta data check`)", len(annotations.problems))
    frame = select_split(annotations.frame, split)
    check_cache_fits(annotations.info.images_root, spec.image_size)
    preds = predictor.predict_frame(frame)
    where = f"split '{split}' of {cfg.data.data}"
    metrics = score_metrics(frame, preds, spec, where)
    if preds.uncalibrated is not None:
        metrics["calibration"] = spec.calibration["method"]
        own = dataclasses.replace(preds, score=preds.uncalibrated, uncalibrated=None)  # before the map
        metrics["before_calibration"] = score_metrics(frame, own, spec, where)
        _warn_if_tails_worse(spec.calibration, metrics, split)
    metrics |= {"split": split, "checkpoint": checkpoint.path}
    write_evaluation(Path(out), frame, preds, spec, metrics, title=f"{Path(checkpoint.path).name} on {split}")
    return metrics


def _warn_if_tails_worse(calibration: dict, metrics: dict, split: str) -> None:
    """Warn when the stored map raised the tail MAE (mean of the low and high buckets) where it was fitted
    (its record from `elta calibrate`) or on the evaluated split."""
    fitted = calibration.get("validation")
    if fitted and fitted["after"] > fitted["before"]:
        log.warning(
            "the checkpoint's %s calibration map raised the tail MAE on the rows it was fitted on (%.4f → %.4f): "
            "refit it with `elta calibrate --method auto`, or evaluate with --no-calibration",
            calibration["method"], fitted["before"], fitted["after"],
        )  # fmt: skip
    before, after = ((m["mae_low"] + m["mae_high"]) / 2 for m in (metrics["before_calibration"], metrics))
    if after > before:
        log.warning(
            "the checkpoint's %s calibration map raises the tail MAE on split '%s' (%.4f → %.4f)",
            calibration["method"], split, before, after,
        )  # fmt: skip


def _json_safe(value):
    """``value`` with NaN and infinite floats as None (null in JSON), inside dicts too."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and not np.isfinite(value) else value
