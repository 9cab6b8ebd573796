"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of tensors and plain Python values (``torch.load(..., weights_only=True)`` reads it):
``kind``, ``version``, ``spec`` (the :class:`~elta.models.ModelSpec` as a dict), ``model`` (state dict),
and for training state ``optimizer``, ``scheduler``, ``epoch`` (completed epochs), ``step`` (batches done in
the current epoch), ``global_step``, ``best_metric``, ``best_epoch``, ``config`` (the run's config dict).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from elta import __version__
from elta.errors import CheckpointError
from elta.models.backbones import create_backbone
from elta.models.model import AestheticModel, ModelSpec
from elta.utils import atomic_write

__all__ = [
    "CheckpointError",
    "atomic_torch_save",
    "save_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
]

log = logging.getLogger(__name__)

KIND = "elta-checkpoint"


def atomic_torch_save(obj: object, path: str | Path) -> Path:
    """``torch.save`` through :func:`~elta.utils.atomic_write`."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def save_checkpoint(path: str | Path, model: AestheticModel, **state: Any) -> Path:
    """Write ``model`` (weights + spec) and any training ``state`` atomically to ``path``."""
    payload = {
        "kind": KIND,
        "version": __version__,
        "spec": model.spec.to_dict(),
        "model": model.state_dict(),
    }
    payload.update(state)
    return atomic_torch_save(payload, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely (no arbitrary pickle); errors name the file and what is wrong."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"{path}: a folder without best.pt or last.pt")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated files, foreign pickles: all unreadable for the user
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise CheckpointError(f"{path}: not an elta checkpoint (no 'kind': '{KIND}' entry)")
    payload["path"] = str(path)
    return payload


def model_from_checkpoint(
    checkpoint: str | Path | dict, device: torch.device | str = "cpu"
) -> AestheticModel:
    """Rebuild the model of a checkpoint (architecture from its spec, weights from the file) in eval mode."""
    payload = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    spec = ModelSpec.from_dict(payload["spec"])
    model = AestheticModel(create_backbone(spec.backbone, weights="none", image_size=spec.image_size), spec)
    model.load_state_dict(payload["model"])
    return model.to(device).eval()
