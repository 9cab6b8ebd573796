"""Evaluation of a checkpoint on a dataset split: metrics.json, predictions.csv, report.png."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from elta.calibration import calibrated_scores
from elta.config import RunConfig
from elta.data.cache import check_cache_fits
from elta.data.dataset import AnnotationDataset, dist_columns
from elta.data.transforms import ImageTransform
from elta.engine.checkpoint import model_from_checkpoint
from elta.engine.inference import Predictions, run_inference
from elta.engine.precision import Precision
from elta.engine.prepare import read_dataset
from elta.engine.report import draw_report
from elta.engine.runtime import resolve_device
from elta.metrics import evaluate
from elta.models.model import ModelSpec
from elta.models.original import load_any_checkpoint
from elta.utils import atomic_write_text

__all__ = ["evaluate_checkpoint", "select_split", "score_metrics", "write_evaluation"]

log = logging.getLogger(__name__)


def select_split(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of ``split`` (train | val | test | all); an empty selection is an error naming what exists."""
    if split == "all":
        chosen = df
    else:
        chosen = df[df["split"] == split]
    if chosen.empty:
        counts = df["split"].replace("", "(none)").value_counts().to_dict()
        raise ValueError(
            f"no rows in split '{split}' (splits here: {counts}); choose --split with one of them or all"
        )
    return chosen.reset_index(drop=True)


def score_metrics(frame: pd.DataFrame, preds: Predictions, spec: ModelSpec) -> dict:
    """The metrics of SPEC.md for predictions on ``frame`` (rows whose image failed are left out)."""
    ok = preds.ok
    if not ok.any():
        raise RuntimeError(f"none of the {len(frame)} images could be read")
    cols = dist_columns(frame)
    gt = frame["mos"].to_numpy(dtype=np.float64)
    groups = frame["group"].astype(str).to_numpy()
    use_dist = preds.dist is not None and bool(cols)
    gt_dist = frame[cols].to_numpy(dtype=np.float64) if use_dist else None
    metrics = evaluate(
        preds.score[ok],
        gt[ok],
        pred_dist=preds.dist[ok] if use_dist else None,
        gt_dist=gt_dist[ok] if use_dist else None,
        threshold=spec.acc_threshold,
        score_range=tuple(spec.score_range),
        groups=groups[ok] if spec.group_counts and (groups != "").any() else None,
        group_counts=spec.group_counts or None,
    )
    metrics["skipped"] = int((~ok).sum())
    return metrics


def write_evaluation(
    out: Path,
    frame: pd.DataFrame,
    preds: Predictions,
    spec: ModelSpec,
    metrics: dict,
    title: str,
    uncalibrated: np.ndarray | None = None,
) -> None:
    """metrics.json, predictions.csv (image_id, gt, pred, pred_std[, pred_uncalibrated], p1..pK, group, error)
    and report.png."""
    gt = frame["mos"].to_numpy(dtype=np.float64)
    groups = frame["group"].astype(str).to_numpy()
    table = pd.DataFrame(
        {"image_id": frame["image_id"], "gt": gt, "pred": preds.score, "pred_std": preds.std}
    )
    if uncalibrated is not None:  # pred went through the checkpoint's calibration map
        table["pred_uncalibrated"] = uncalibrated
    if preds.dist is not None:
        for k in range(preds.dist.shape[1]):
            table[f"p{k + 1}"] = preds.dist[:, k]
    if (groups != "").any():
        table["group"] = groups
    table["error"] = preds.errors
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "predictions.csv", table.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "metrics.json", json.dumps(_json_safe(metrics), indent=2))
    ok = preds.ok
    draw_report(preds.score[ok], gt[ok], out / "report.png", title=title, score_range=tuple(spec.score_range))
    if metrics.get("skipped"):
        log.warning(
            "%d images could not be read; their reasons are in %s",
            metrics["skipped"],
            out / "predictions.csv",
        )


def evaluate_checkpoint(
    checkpoint: str | Path,
    cfg: RunConfig,
    out: str | Path,
    *,
    split: str = "test",
    batch_size: int = 32,
    device: str = "auto",
    workers: int | None = None,
    progress: bool = False,
    calibrated: bool = True,
    amp: str = "off",
) -> dict:
    """Score ``split`` of the dataset in ``cfg.data`` and write the evaluation files into ``out``.

    Returns the metrics dict (plus ``skipped``: images that could not be read, listed in predictions.csv).
    With a calibration map in the checkpoint (and ``calibrated``), the metrics are those of the calibrated
    scores and ``before_calibration`` holds the model's own. ``amp`` (auto | bf16 | fp16 | off) runs the
    backbone under autocast, the head in float32.
    """
    payload = load_any_checkpoint(checkpoint)
    dev = resolve_device(device)
    model = model_from_checkpoint(payload, dev)
    spec = model.spec
    annotations = read_dataset(cfg)
    df = annotations.frame
    if annotations.problems:
        log.warning("%d annotation rows could not be used (see `elta data check`)", len(annotations.problems))
    frame = select_split(df, split)
    cols = dist_columns(frame)
    if spec.head == "distribution" and cols and len(cols) != spec.num_bins:
        raise ValueError(
            f"checkpoint predicts {spec.num_bins} bins but {cfg.data.data} has {len(cols)}: "
            "evaluate on a dataset with the same rating scale"
        )
    check_cache_fits(annotations.info.images_root, spec.image_size)
    dataset = AnnotationDataset(frame, ImageTransform.from_spec(spec, train=False))
    preds = run_inference(
        model,
        dataset,
        batch_size=batch_size,
        device=dev,
        workers=workers,
        progress=progress,
        forward=Precision.create(amp, dev).forward(model),
    )
    raw = None
    if spec.calibration and calibrated:
        raw = preds.score
        before = score_metrics(frame, preds, spec)
        preds = dataclasses.replace(preds, score=calibrated_scores(spec, preds.score))
    metrics = score_metrics(frame, preds, spec)
    if raw is not None:
        metrics["calibration"] = spec.calibration["method"]
        metrics["before_calibration"] = before
    metrics["split"] = split
    metrics["checkpoint"] = str(payload["path"])
    write_evaluation(
        Path(out),
        frame,
        preds,
        spec,
        metrics,
        title=f"{Path(payload['path']).name} on {split}",
        uncalibrated=raw,
    )
    return metrics


def _json_safe(metrics: dict) -> dict:
    def clean(v):
        if isinstance(v, dict):
            return _json_safe(v)
        return None if isinstance(v, float) and not np.isfinite(v) else v

    return {k: clean(v) for k, v in metrics.items()}
