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
from elta.data.dataset import AnnotationDataset
from elta.data.transforms import ImageTransform
from elta.engine.checkpoint import CheckpointError, atomic_torch_save, model_from_checkpoint
from elta.engine.evaluate import select_split
from elta.engine.inference import run_inference
from elta.engine.prepare import read_dataset
from elta.engine.runtime import resolve_device
from elta.models.model import ModelSpec
from elta.models.original import load_any_checkpoint

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
    checkpoint: str | Path,
    cfg: RunConfig,
    *,
    method: str = "affine",
    split: str = "val",
    out: str | Path | None = None,
    batch_size: int = 32,
    device: str = "auto",
    workers: int | None = None,
    progress: bool = False,
) -> dict:
    """Fit the map on ``split`` of the dataset in ``cfg`` and write the checkpoint with it (``out`` or in place).

    Returns ``{"calibration": …, "report": {"before": metrics, "after": metrics}, "checkpoint": path}``.
    """
    payload = load_any_checkpoint(checkpoint)
    source = Path(payload.pop("path"))
    if out is None and "imported_from" in payload:
        raise CheckpointError(
            f"{source}: a checkpoint of the original release: give --out for the elta checkpoint"
        )
    dev = resolve_device(device)
    model = model_from_checkpoint(payload, dev)
    spec = model.spec
    df = read_dataset(cfg).frame
    frame = select_split(df, split)
    dataset = AnnotationDataset(frame, ImageTransform.from_spec(spec, train=False))
    preds = run_inference(
        model, dataset, batch_size=batch_size, device=dev, workers=workers, progress=progress
    )
    ok = preds.ok
    gt = frame["mos"].to_numpy(dtype=np.float64)[ok]
    train_gt = (
        df.loc[df["split"] == "train", "mos"].to_numpy(dtype=np.float64) if method == "quantile" else None
    )
    cal, report = fit_for_spec(spec, preds.score[ok], gt, method, train_gt=train_gt)
    payload["spec"] = {**payload["spec"], "calibration": cal.to_dict()}
    target = Path(out) if out is not None else source
    atomic_torch_save(payload, target)
    log.info("calibration (%s, fitted on %d %s images) stored in %s", method, int(ok.sum()), split, target)
    return {"calibration": cal.to_dict(), "report": report, "checkpoint": str(target)}
