"""Pooled-feature cache for frozen-backbone training (regressor retraining, fast ablations).

With the backbone frozen, its pooled output for an image depends only on the image and the
deterministic eval transform (resize to image_size × image_size, no crop or flip). It is computed once
per split and stored with what it depends on; a cache that does not match the run is recomputed.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pandas as pd
import torch

from elta.engine.predictor import Predictor
from elta.models.checkpoint import atomic_torch_save
from elta.models.model import AestheticModel

__all__ = ["FeatureCache", "load_or_compute_features"]

log = logging.getLogger(__name__)


class FeatureCache:
    """Backbone features [N, D] of one split and the rows that failed (index -> reason)."""

    def __init__(self, features: torch.Tensor, failed: dict[int, str]) -> None:
        self.features = features
        self.failed = failed


def _fingerprint(model: AestheticModel, frame: pd.DataFrame, weights_id: str) -> str:
    spec = model.spec
    digest = hashlib.sha256()
    for part in (spec.backbone, weights_id, spec.image_size, spec.interpolation, spec.mean, spec.std):
        digest.update(repr(part).encode())
    digest.update("\n".join(frame["path"].astype(str)).encode())
    return digest.hexdigest()


def load_or_compute_features(
    path: Path,
    predictor: Predictor,
    frames: dict[str, pd.DataFrame],
    weights_id: str,
) -> dict[str, FeatureCache]:
    """Features of every frame in ``frames`` (by split name), from ``path`` when it matches, else computed."""
    stored = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
    result, changed = {}, False
    for split, frame in frames.items():
        key = _fingerprint(predictor.model, frame, weights_id)  # keyed by content, so variants share entries
        entry = stored.get(key)
        if entry is not None:
            result[split] = FeatureCache(entry["features"], {int(k): v for k, v in entry["failed"].items()})
            continue
        log.info("computing backbone features of %d %s images (once; cached in %s)", len(frame), split, path)
        result[split] = FeatureCache(*predictor.backbone_features(frame))
        failed = {str(k): v for k, v in result[split].failed.items()}
        stored[key] = {"split": split, "features": result[split].features, "failed": failed}
        changed = True
    if changed:
        atomic_torch_save(stored, path)
    return result
