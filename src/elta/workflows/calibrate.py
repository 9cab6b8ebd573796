"""``elta calibrate``: fit a monotone map from predicted to true MOS on validation predictions.

The map (:mod:`elta.calibration`) is stored in the checkpoint's spec; ``predict`` and ``evaluate`` apply it
to the score unless told not to. The predicted distribution is left as the model gives it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from elta.calibration import Calibration, calibration_report, fit_calibration
from elta.config import RunConfig
from elta.engine.evaluate import check_readable, select_split
from elta.engine.predictor import Predictor
from elta.engine.prepare import read_dataset
from elta.engine.runtime import Runtime
from elta.errors import CheckpointError
from elta.models.checkpoint import Checkpoint, load_checkpoint
from elta.models.model import ModelSpec

__all__ = ["calibrate_checkpoint", "fit_for_spec"]

log = logging.getLogger(__name__)


def fit_for_spec(
    spec: ModelSpec, pred: np.ndarray, gt: np.ndarray, method: str, train_gt: np.ndarray | None = None
) -> tuple[Calibration, dict]:
    """Fit ``method`` on (pred, gt) and report the metrics before and after on the same rows."""
    cal = fit_calibration(pred, gt, method, score_range=tuple(spec.score_range), train_gt=train_gt)
    report = calibration_report(pred, gt, cal, threshold=spec.acc_threshold)
    return cal, report


def calibrate_checkpoint(
    checkpoint: Checkpoint | str | Path,
    cfg: RunConfig,
    runtime: Runtime | None = None,
    *,
    method: str = "affine",
    split: str = "val",
    out: str | Path | None = None,
) -> dict:
    """Fit the map on ``split`` of the dataset in ``cfg`` and write the checkpoint with it (``out`` or in place).

    The map is fitted on the model's own scores (an earlier map is replaced, not composed).
    Returns ``{"calibration": …, "report": {"before": metrics, "after": metrics}, "checkpoint": path}``.
    """
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(checkpoint)
    if out is None and checkpoint.imported_from is not None:
        raise CheckpointError(
            f"{checkpoint.path}: a checkpoint of the original release: give --out for the elta checkpoint"
        )
    predictor = Predictor.from_checkpoint(checkpoint, runtime, calibrated=False)
    df = read_dataset(cfg).frame
    frame = select_split(df, split)
    preds = predictor.predict_frame(frame, desc="calibrating")
    check_readable(preds, f"split '{split}' of {cfg.data.data}")
    ok = preds.ok
    gt = frame["mos"].to_numpy(dtype=np.float64)[ok]
    train_rows = df.loc[df["split"] == "train", "mos"]
    train_gt = train_rows.to_numpy(dtype=np.float64) if method == "quantile" else None
    cal, report = fit_for_spec(predictor.spec, preds.score[ok], gt, method, train_gt=train_gt)
    target = Path(out) if out is not None else Path(checkpoint.path)
    checkpoint.with_calibration(cal.to_dict()).save(target)
    log.info("calibration (%s, fitted on %d %s images) stored in %s", method, int(ok.sum()), split, target)
    return {"calibration": cal.to_dict(), "report": report, "checkpoint": str(target)}
