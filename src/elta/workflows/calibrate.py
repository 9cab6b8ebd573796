"""``elta calibrate``: fit a monotone map from predicted to true MOS on validation predictions.

The map (:mod:`elta.calibration`) is stored in the checkpoint's spec; ``predict`` and ``evaluate`` apply it
to the score unless told not to. The predicted distribution is left as the model gives it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from elta.calibration import Calibration, calibration_report, choose_calibration
from elta.config import RunConfig
from elta.engine.evaluate import check_readable, select_split
from elta.engine.predictor import Predictor
from elta.engine.prepare import read_dataset
from elta.engine.runtime import Runtime
from elta.errors import CheckpointError
from elta.models.checkpoint import Checkpoint, load_checkpoint

__all__ = ["calibrate_checkpoint"]

log = logging.getLogger(__name__)


def calibrate_checkpoint(
    checkpoint: Checkpoint | str | Path,
    cfg: RunConfig,
    runtime: Runtime | None = None,
    *,
    method: str = "auto",
    objective: str = "tail",
    split: str = "val",
    out: str | Path | None = None,
) -> dict:
    """Fit the map on ``split`` of the dataset in ``cfg`` and write the checkpoint with it (``out`` or in place).

    ``method``: auto (the map that serves the tails best by ``objective``, possibly none: see
    :func:`elta.calibration.select_calibration`), affine, quantile or isotonic. The map is fitted on the model's
    own scores (an earlier map is replaced, not composed); beside it the checkpoint records the objective on
    ``split`` before and after, which ``elta evaluate`` checks. Returns ``{"calibration": stored dict or None,
    "selection": Selection, "report": {"before": metrics, "after": metrics}, "checkpoint": path}``.
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
    pred, gt = preds.score[ok], frame["mos"].to_numpy(dtype=np.float64)[ok]
    train_gt = df.loc[df["split"] == "train", "mos"].to_numpy(dtype=np.float64)
    score_range = tuple(predictor.spec.score_range)
    selection = choose_calibration(
        pred, gt, method, score_range=score_range, train_gt=train_gt, objective=objective
    )
    cal = selection.calibration
    # without a map, the report's "after" is the identity (clipping to the range only)
    shown = cal or Calibration("affine", {"a": 1.0, "b": 0.0}, score_range, pred.size)
    report = calibration_report(pred, gt, shown, threshold=predictor.spec.acc_threshold)
    target = Path(out) if out is not None else Path(checkpoint.path)
    stored = None if cal is None else {**cal.to_dict(), **selection.record()}
    checkpoint.with_calibration(stored).save(target)
    log.info(
        "calibration (%s, chosen on %d %s images) stored in %s", selection.chosen, pred.size, split, target
    )
    return {"calibration": stored, "selection": selection, "report": report, "checkpoint": str(target)}
