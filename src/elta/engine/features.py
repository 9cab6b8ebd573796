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

from elta.data.dataset import AnnotationDataset
from elta.data.transforms import ImageTransform
from elta.engine.checkpoint import atomic_torch_save
from elta.engine.inference import map_batches
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


@torch.no_grad()
def _compute(
    model: AestheticModel, frame: pd.DataFrame, batch_size: int, device, workers, progress
) -> FeatureCache:
    dataset = AnnotationDataset(frame, ImageTransform.from_spec(model.spec, train=False))
    features = torch.zeros(len(frame), model.backbone.num_features)
    errors = [""] * len(frame)
    model.eval()
    for idx, out in map_batches(
        dataset,
        model.backbone,
        errors,
        batch_size=batch_size,
        device=device,
        workers=workers,
        progress=progress,
        desc="caching features",
    ):
        features[torch.from_numpy(idx)] = out.float().cpu()
    failed = {i: e for i, e in enumerate(errors) if e}
    return FeatureCache(features, failed)


def load_or_compute_features(
    path: Path,
    model: AestheticModel,
    frames: dict[str, pd.DataFrame],
    weights_id: str,
    *,
    batch_size: int,
    device: torch.device,
    workers: int,
    progress: bool = False,
) -> dict[str, FeatureCache]:
    """Features of every frame in ``frames`` (by split name), from ``path`` when it matches, else computed."""
    stored = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
    result, changed = {}, False
    for split, frame in frames.items():
        key = _fingerprint(model, frame, weights_id)  # entries are keyed by content, so variants share them
        entry = stored.get(key)
        if entry is not None:
            result[split] = FeatureCache(entry["features"], {int(k): v for k, v in entry["failed"].items()})
            continue
        log.info("computing backbone features of %d %s images (once; cached in %s)", len(frame), split, path)
        result[split] = _compute(model, frame, batch_size, device, workers, progress)
        failed = {str(k): v for k, v in result[split].failed.items()}
        stored[key] = {"split": split, "features": result[split].features, "failed": failed}
        changed = True
    if changed:
        atomic_torch_save(stored, path)
    return result
