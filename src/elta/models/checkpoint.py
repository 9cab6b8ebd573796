"""Checkpoints: the one writer and the one loader, for elta's files and those of the original ELTA release.

A checkpoint file is a dict of tensors and plain Python values, so ``torch.load(..., weights_only=True)`` reads
it without unpickling arbitrary objects: ``kind``, ``version``, ``spec`` (:class:`~elta.models.ModelSpec` as a
dict), ``model`` (state dict), ``config`` (the training run's config dict), ``imported_from`` (an original-release
file's provenance) and, in ``last.pt`` only, the training state: ``optimizer``, ``scheduler``, ``scaler``,
``enhancers`` and the progress counters (``epoch``, ``step``, ``global_step``, ``best_metric``, …).
``best.pt`` holds weights, spec and config only.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from elta import __version__
from elta.calibration import Calibration
from elta.errors import CheckpointError
from elta.models.backbones import create_backbone
from elta.models.model import AestheticModel, ModelSpec
from elta.models.original import DEFAULT_BACKBONE, convert_original, is_original_checkpoint, state_dict_of
from elta.utils import atomic_write

__all__ = [
    "Checkpoint",
    "atomic_torch_save",
    "save_checkpoint",
    "load_checkpoint",
    "read_original_checkpoint",
    "original_checkpoint",
    "import_original_checkpoint",
]

KIND = "elta-checkpoint"
_OWN_KEYS = ("kind", "version", "spec", "model", "config", "imported_from")
# numpy scalar types whose pickles may sit in an original checkpoint's 'best_metric' (scipy's SRCC is float64)
_NUMPY_SCALAR_CODES = "?bhilqBHILQefd"


@dataclass
class Checkpoint:
    """A trained model as stored: its spec, its weights, and what else the file held (``training``: the
    entries beyond the module docstring's own, e.g. the training state of ``last.pt``)."""

    spec: ModelSpec
    weights: dict[str, torch.Tensor]
    path: str = ""
    config: dict | None = None  # the training run's RunConfig.to_dict()
    training: dict[str, Any] = field(default_factory=dict)
    imported_from: dict | None = None  # provenance of a converted original-release checkpoint
    version: str = __version__

    @classmethod
    def of(cls, model: AestheticModel, **fields: Any) -> Checkpoint:
        """The checkpoint of ``model`` as it is now (spec copied, weights by reference)."""
        return cls(spec=ModelSpec.from_dict(model.spec.to_dict()), weights=model.state_dict(), **fields)

    def build_model(self, device: torch.device | str = "cpu") -> AestheticModel:
        """The model (architecture from the spec, weights from the file) on ``device``, in eval mode."""
        spec = self.spec
        backbone = create_backbone(spec.backbone, weights="none", image_size=spec.image_size)
        model = AestheticModel(backbone, ModelSpec.from_dict(spec.to_dict()))
        try:
            model.load_state_dict(self.weights)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{self.path or 'checkpoint'}: weights do not fit {spec.backbone}: {exc}"
            ) from exc
        return model.to(device).eval()

    def with_calibration(self, calibration: dict | None) -> Checkpoint:
        """A copy whose score goes through ``calibration`` (see :mod:`elta.calibration`); None removes the map."""
        return dataclasses.replace(self, spec=dataclasses.replace(self.spec, calibration=calibration))

    def save(self, path: str | Path) -> Path:
        """Write atomically (readers see the old file or the whole new one)."""
        payload = {"kind": KIND, "version": self.version, "spec": self.spec.to_dict(), "model": self.weights}
        optional = {"config": self.config, "imported_from": self.imported_from}
        payload |= {k: v for k, v in optional.items() if v is not None}
        return atomic_torch_save({**payload, **self.training}, path)


def atomic_torch_save(obj: object, path: str | Path) -> Path:
    """``torch.save`` through :func:`~elta.utils.atomic_write`."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def save_checkpoint(
    path: str | Path,
    model: AestheticModel,
    *,
    config: dict | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (weights + spec), the run's ``config`` and, for ``last.pt``, its ``training`` state."""
    return Checkpoint.of(model, config=config, training=dict(training or {})).save(path)


def _numpy_safe_globals() -> list:
    """What numpy scalars (``np.float64(0.76)``) unpickle through, under numpy 1.x and 2.x module names."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed: list = [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
    ]
    return allowed + sorted({type(np.dtype(code)) for code in _NUMPY_SCALAR_CODES}, key=str)


def _safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, also accepting numpy scalars; any other object is refused."""
    if not hasattr(torch.serialization, "safe_globals"):
        raise CheckpointError(
            f"{path}: reading checkpoints safely needs torch >= 2.6 (this is torch {torch.__version__}); "
            "upgrade torch"
        )
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # refused objects, truncated files, not a torch file at all
        message = str(exc)
        refused = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", message)
        if refused:
            what = refused.group(1) or refused.group(2)
            raise CheckpointError(
                f"{path}: holds a Python object that is not loaded, for safety ({what}); "
                "checkpoints are read with weights_only. If you trust the file, keep only its weights, in a "
                "separate Python session: "
                "torch.save({'state_dict': torch.load(PATH, weights_only=False)['state_dict']}, "
                "'weights.pth')"
            ) from exc
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", message, re.S)
        detail = reason.group(1) if reason else f"{type(exc).__name__}: {message}"
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({detail})") from exc


def _file_of(path: Path) -> Path:
    """A checkpoint file, or a run folder's best.pt (else last.pt)."""
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: a folder without best.pt or last.pt")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path


def _from_payload(payload: dict, path: Path) -> Checkpoint:
    try:
        spec = ModelSpec.from_dict(payload["spec"])
        weights = payload["model"]
        if spec.calibration:
            Calibration.from_dict(spec.calibration)  # a broken map fails here, not at the first prediction
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: an elta checkpoint without a usable spec or weights ({exc})") from exc
    training = {k: v for k, v in payload.items() if k not in _OWN_KEYS}
    stored = {"config": payload.get("config"), "imported_from": payload.get("imported_from")}
    return Checkpoint(
        spec, weights, str(path), training=training, version=str(payload.get("version", "")), **stored
    )


def load_checkpoint(path: str | Path, *, head: str = "auto") -> Checkpoint:
    """Read an elta checkpoint (file or run folder) or an original ELTA one, converted in memory.

    Nothing is written; no arbitrary pickle is executed. ``head`` chooses the head of an original-release file
    (``auto``: the one its run trained). Errors name the file and what is wrong.
    """
    path = _file_of(Path(path))
    obj = _safe_load(path)
    if isinstance(obj, dict) and obj.get("kind") == KIND:
        return _from_payload(obj, path)
    if not is_original_checkpoint(obj):
        raise CheckpointError(
            f"{path}: neither an elta checkpoint (no 'kind': '{KIND}' entry) nor an original ELTA checkpoint "
            "(no 'vit.*' and 'linear_emd.*' / 'linear_mse.*' weights)"
        )
    return original_checkpoint(
        obj if "state_dict" in obj else {"state_dict": obj}, head=head, source=str(path)
    )


def read_original_checkpoint(path: str | Path) -> dict:
    """Load an original ELTA checkpoint as it is (safely); a bare state dict comes back as ``{'state_dict': …}``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    obj = _safe_load(path)
    if not is_original_checkpoint(obj):
        raise CheckpointError(
            f"{path}: not an original ELTA checkpoint (expected 'vit.*' and 'linear_emd.*' / 'linear_mse.*' "
            "weights under 'state_dict'); elta's own checkpoints are read with load_checkpoint"
        )
    if "state_dict" not in obj:
        obj = {"state_dict": obj}
    obj["state_dict"] = state_dict_of(obj)
    return obj


def original_checkpoint(
    original: dict,
    *,
    head: str = "auto",
    backbone: str | nn.Module = DEFAULT_BACKBONE,
    image_size: int = 256,
    source: str = "",
) -> Checkpoint:
    """An elta :class:`Checkpoint` from a loaded original checkpoint (see :func:`elta.models.original.convert_original`)."""
    try:
        model, provenance = convert_original(original, head=head, backbone=backbone, image_size=image_size)
    except ValueError as exc:
        raise CheckpointError(f"{source or 'original checkpoint'}: {exc}") from exc
    return Checkpoint.of(
        model, path=source, imported_from={"format": "elta-original", "path": source, **provenance}
    )


def import_original_checkpoint(
    path: str | Path,
    out: str | Path,
    *,
    head: str = "auto",
    backbone: str = DEFAULT_BACKBONE,
    image_size: int = 256,
) -> Path:
    """Convert the original ELTA checkpoint at ``path`` and write it as an elta checkpoint to ``out``."""
    original = read_original_checkpoint(path)
    model = {"head": head, "backbone": backbone, "image_size": image_size}
    return original_checkpoint(original, **model, source=str(path)).save(out)
