"""Pooled-feature cache for frozen-backbone training (regressor retraining, fast ablations).

With the backbone frozen, its pooled output for an image depends only on the image and the
deterministic eval transform (resize to image_size × image_size, no crop or flip). It is computed once
per split and stored under a fingerprint of what it depends on: the backbone's weights as they are in the
model (their bytes, not the checkpoint's path, so a retrained checkpoint at the same path is not served old
features), the transform, and each image file's path, size and modification time. A cache entry that does
not match the run is recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch

from elta.engine.predictor import Predictor
from elta.models.checkpoint import atomic_torch_save
from elta.models.model import AestheticModel

__all__ = ["FeatureCache", "load_or_compute_features"]

log = logging.getLogger(__name__)


class FeatureCache(NamedTuple):
    """Backbone features [N, D] of one split and the rows that failed (index -> reason)."""

    features: torch.Tensor
    failed: dict[int, str]


def _weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``module``'s state-dict tensors."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_stamp(path: str) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return f"{path}\tmissing"
    return f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}"


def _fingerprint(model: AestheticModel, frame: pd.DataFrame, weights: str) -> str:
    spec = model.spec
    digest = hashlib.sha256()
    for part in (spec.backbone, weights, spec.image_size, spec.interpolation, spec.mean, spec.std):
        digest.update(repr(part).encode())
    digest.update("\n".join(_file_stamp(p) for p in frame["path"].astype(str)).encode())
    return digest.hexdigest()


def load_or_compute_features(
    path: Path, predictor: Predictor, frames: dict[str, pd.DataFrame]
) -> dict[str, FeatureCache]:
    """Features of every frame in ``frames`` (by split name), from ``path`` when it matches, else computed."""
    stored = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
    result, changed = {}, False
    weights = _weights_digest(predictor.model.backbone)
    for split, frame in frames.items():
        key = _fingerprint(predictor.model, frame, weights)  # keyed by content, so variants share entries
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
