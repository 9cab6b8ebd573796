"""Scoring photos with a trained checkpoint: the :class:`Scorer` behind ``elta predict`` and ``elta.load``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from elta.calibration import calibrated_scores
from elta.data.dataset import ImageListDataset
from elta.data.images import list_images
from elta.data.transforms import ImageTransform
from elta.engine.checkpoint import model_from_checkpoint
from elta.engine.inference import run_inference
from elta.engine.precision import Precision
from elta.engine.runtime import resolve_device
from elta.models.original import load_any_checkpoint
from elta.utils import atomic_write_text

__all__ = ["Scorer", "load", "write_scores"]


class Scorer:
    """A trained model ready to score images on its dataset's scale.

    >>> scorer = elta.load("runs/demo/best.pt")
    >>> scorer.score(["a.jpg", "photos/"])      # DataFrame: path, score, std, p1..pK, error
    """

    def __init__(
        self,
        checkpoint: str | Path | dict,
        device: str = "auto",
        batch_size: int = 32,
        workers: int | None = None,
        calibrated: bool = True,
        amp: str = "off",
    ) -> None:
        payload = checkpoint if isinstance(checkpoint, dict) else load_any_checkpoint(checkpoint)
        self.device = resolve_device(device)
        self.model = model_from_checkpoint(payload, self.device)
        self.spec = self.model.spec
        self.transform = ImageTransform.from_spec(self.spec, train=False)
        self.batch_size = batch_size
        self.workers = workers
        self.calibrated = calibrated and bool(self.spec.calibration)
        self.precision = Precision.create(amp, self.device)  # autocast of the backbone; head in float32

    def score(self, images: str | Path | Sequence | torch.Tensor, progress: bool = False) -> pd.DataFrame:
        """Score paths (files, folders, list files), PIL images, or a tensor batch [B, 3, H, W].

        Tensors must already be resized and normalised as ``self.transform`` does. Unreadable files get
        their reason in the ``error`` column; the others are scored.
        """
        if isinstance(images, torch.Tensor):
            items: list = list(images) if images.dim() == 4 else [images]
            names = [f"tensor[{i}]" for i in range(len(items))]
        else:
            if isinstance(images, (str, Path)) or hasattr(images, "convert"):
                images = [images]
            items, names = [], []
            for entry in images:
                if isinstance(entry, (str, Path)):
                    found = list_images([entry])
                    items += found
                    names += [str(p) for p in found]
                else:
                    names.append(f"image[{len(items)}]")
                    items.append(entry)
        preds = run_inference(
            self.model,
            ImageListDataset(items, self.transform),
            batch_size=self.batch_size,
            device=self.device,
            workers=self.workers if self.workers is not None else (0 if len(items) < 64 else None),
            progress=progress,
            forward=self.precision.forward(self.model),
        )
        score = calibrated_scores(self.spec, preds.score) if self.calibrated else preds.score
        frame = pd.DataFrame({"path": names, "score": score, "std": preds.std})
        if preds.dist is not None:
            for k in range(preds.dist.shape[1]):
                frame[f"p{k + 1}"] = preds.dist[:, k]
        if self.calibrated:  # the distribution is the model's own; the score went through the map
            frame["score_uncalibrated"] = preds.score
        frame["error"] = preds.errors
        return frame


def load(checkpoint: str | Path, device: str = "auto", batch_size: int = 32) -> Scorer:
    """Load a checkpoint (file or run folder) for scoring."""
    return Scorer(checkpoint, device=device, batch_size=batch_size)


def write_scores(frame: pd.DataFrame, out: str | Path) -> Path:
    """Write scores as CSV, or as JSON when ``out`` ends in .json (NaN becomes null)."""
    out = Path(out)
    if out.suffix.lower() == ".json":
        records = frame.replace({np.nan: None}).to_dict("records")
        return atomic_write_text(out, json.dumps(records, indent=1))
    return atomic_write_text(out, frame.to_csv(index=False, float_format="%.6g"))
