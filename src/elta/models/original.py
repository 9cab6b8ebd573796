"""Checkpoints of the original ELTA code (ICML 2024 release): read safely, convert, score identically.

The original saves ``torch.save({'epoch', 'state_dict', 'optimizer', 'best_metric'})`` of a module with
``vit`` (timm 0.6.12 ``swinv2_base_window8_256``), ``linear_emd`` (Linear(1024, 64) → ReLU → Linear(64, 10),
softmax outside) and ``linear_mse`` (Dropout → Linear(1024, 1) → Sigmoid, trained on MOS / 10, its
predictions multiplied by 10).

timm 0.6.12 → current timm, SwinV2 (the maths is the same, only names and buffers differ):

- the patch merging at the end of stage i (``layers.i.downsample``) is at the start of stage i + 1 now
  (``layers.{i+1}.downsample``); its 2×2 gather order (x0 = [0::2, 0::2], x1 = [1::2, 0::2],
  x2 = [0::2, 1::2], x3 = [1::2, 1::2]) equals the current reshape/permute layout, and reduction → norm is
  unchanged;
- ``attn_mask`` was a persistent buffer (present for shifted blocks) and is recomputed now; ``relative_*``
  tables and ``k_bias`` are recomputed in both;
- the classifier ``head`` became ``head.fc``; ELTA never uses it (it pools ``forward_features``), so it is
  dropped.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from elta.models.backbones import backbone_data_config
from elta.models.model import AestheticModel, ModelSpec

__all__ = [
    "DEFAULT_BACKBONE",
    "is_original_checkpoint",
    "state_dict_of",
    "original_head",
    "convert_original_state_dict",
    "convert_original",
]

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "swinv2_base_window8_256"
HEAD_PREFIXES = {"distribution": "linear_emd.", "scalar": "linear_mse."}
RECOMPUTED_BUFFERS = ("attn_mask", "relative_position_index", "relative_coords_table", "k_bias")
DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def state_dict_of(obj: Any) -> dict | None:
    """The weights of a loaded original checkpoint (or a bare state dict), without a DataParallel prefix."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        return None
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def is_original_checkpoint(obj: Any) -> bool:
    """True for a loaded original checkpoint (or bare state dict): ``vit.*`` and ``linear_emd/mse.*`` keys."""
    state = state_dict_of(obj) or {}
    has_head = any(k.startswith(prefix) for k in state for prefix in HEAD_PREFIXES.values())
    return has_head and any(k.startswith("vit.") for k in state)


def original_head(checkpoint: dict) -> str | None:
    """The head the original run trained, from its Adam state: ``distribution``, ``scalar``, None if unclear.

    Both heads are in every original checkpoint, but only the trained one has optimizer state. The original's
    parameters are ordered ``vit``, ``linear_emd`` (4 tensors), ``linear_mse`` (2 tensors).
    """
    opt = checkpoint.get("optimizer")
    try:
        ids = [i for group in opt["param_groups"] for i in group["params"]]
        trained = set(opt["state"])
    except (TypeError, KeyError):
        return None
    state = state_dict_of(checkpoint) or {}
    n_params = sum(1 for k in state if k.rsplit(".", 1)[-1] not in RECOMPUTED_BUFFERS)
    if len(ids) != n_params or n_params < 6:
        return None
    emd = any(i in trained for i in ids[-6:-2])
    mse = any(i in trained for i in ids[-2:])
    if emd == mse:
        return None
    return "distribution" if emd else "scalar"


def _backbone_key(key: str) -> str | None:
    """A timm 0.6.12 SwinV2 key (without ``vit.``) in current timm naming, or None if it is dropped."""
    if key.startswith("head.") or key.rsplit(".", 1)[-1] in RECOMPUTED_BUFFERS:
        return None
    found = DOWNSAMPLE.match(key)
    if found:
        return f"layers.{int(found.group(1)) + 1}.downsample.{key[found.end() :]}"
    return key


def _target_backbone(backbone: str | nn.Module) -> nn.Module:
    """The current-timm SwinV2 to convert for: a given module, or one built by name on the meta device."""
    if isinstance(backbone, nn.Module):
        return backbone
    if not backbone.startswith("swinv2"):
        raise ValueError(
            f"backbone {backbone!r}: the original ELTA code uses SwinV2 (timm {DEFAULT_BACKBONE}); "
            "only swinv2_* backbones can be converted"
        )
    with torch.device("meta"):  # names and shapes only: no memory, no weights
        return timm.create_model(backbone, pretrained=False, num_classes=0)


def _check_against(converted: dict, expected: dict[str, torch.Size], backbone_name: str) -> None:
    missing = [k for k in expected if k not in converted]
    extra = [k for k in converted if k not in expected]
    fitting = [(k, shape) for k, shape in expected.items() if k in converted]
    wrong = [f"{k} {tuple(converted[k].shape)} vs {tuple(s)}" for k, s in fitting if converted[k].shape != s]
    if missing or extra or wrong:
        problems = [
            f"{label}: {', '.join(items[:4])}{' …' if len(items) > 4 else ''}"
            for label, items in (("missing", missing), ("unexpected", extra), ("shape", wrong))
            if items
        ]
        raise ValueError(
            f"weights do not fit {backbone_name} ({'; '.join(problems)}); pass the backbone the original "
            f"model was built with (the release uses {DEFAULT_BACKBONE})"
        )


def convert_original_state_dict(
    state_dict: dict[str, torch.Tensor],
    backbone: str | nn.Module = DEFAULT_BACKBONE,
    head: str = "distribution",
) -> dict[str, torch.Tensor]:
    """Original ``vit.* / linear_emd.* / linear_mse.*`` weights → :class:`AestheticModel` keys.

    ``backbone`` is a timm SwinV2 name, or a built current-timm SwinV2 (``num_classes=0``) for a configuration
    timm does not register. ``head`` picks ``linear_emd`` (``distribution``) or ``linear_mse`` (``scalar``).
    Every key and shape is checked against the target; a mismatch raises ValueError.
    """
    if head not in HEAD_PREFIXES:
        raise ValueError(f"head must be one of {tuple(HEAD_PREFIXES)}; got {head!r}")
    state = state_dict_of(state_dict) or {}
    head_prefix = HEAD_PREFIXES[head]
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith("vit."):
            new = _backbone_key(key[len("vit.") :])
            if new is not None:
                converted[f"backbone.{new}"] = tensor
        elif key.startswith(head_prefix):
            # linear_emd.{0,2} → head.{0,2}; linear_mse.1 → head.1 (its Sigmoid has no weights)
            converted[f"head.{key[len(head_prefix) :]}"] = tensor
    net = _target_backbone(backbone)
    name = backbone if isinstance(backbone, str) else type(backbone).__name__
    expected = {f"backbone.{k}": v.shape for k, v in net.state_dict().items()}
    dim = net.num_features
    if head == "distribution":
        bins = converted["head.2.weight"].shape[0] if "head.2.weight" in converted else 10
        expected.update({"head.0.weight": (64, dim), "head.0.bias": (64,)})
        expected.update({"head.2.weight": (bins, 64), "head.2.bias": (bins,)})
    else:
        expected.update({"head.1.weight": (1, dim), "head.1.bias": (1,)})
    _check_against(converted, {k: torch.Size(v) for k, v in expected.items()}, name)
    return converted


def _spec(head: str, backbone: str, net: nn.Module, image_size: int) -> ModelSpec:
    """The original's scale and input pipeline.

    AVA bins 1..10; the scalar head predicts MOS / 10, so its range is [0, 10]. The original resizes with
    torchvision's ``Resize((256, 256))``, whose default is bilinear (timm's config says bicubic), and normalises
    with ImageNet mean/std, which is SwinV2's pretrained config.
    """
    data_cfg = backbone_data_config(net)
    size = {"image_size": image_size, "resize": round(image_size * 300 / 256)}  # the paper's 256 and 300
    scale = {"centers": [float(c) for c in range(1, 11)], "acc_threshold": 5.0}
    scale["score_range"] = [1.0, 10.0] if head == "distribution" else [0.0, 10.0]
    normalise = {"mean": data_cfg["mean"], "std": data_cfg["std"], "interpolation": "bilinear"}
    return ModelSpec(backbone, head, **size, **normalise, **scale)


def _resolve_head(checkpoint: dict, head: str) -> str:
    if head not in ("auto", *HEAD_PREFIXES):
        raise ValueError(f"head must be auto, distribution or scalar; got {head!r}")
    found = original_head(checkpoint)
    if head == "auto":
        if found is None:
            log.warning("cannot tell which head the original run trained: using the distribution head")
            return "distribution"
        return found
    if found is not None and found != head:
        log.warning("the original run trained the %s head, but the %s head was asked for", found, head)
    return head


def _provenance(checkpoint: dict) -> dict[str, Any]:
    """Plain values about the original run (weights_only-safe): its epoch and best metric, when recorded."""
    info: dict[str, Any] = {}
    if isinstance(checkpoint.get("epoch"), (int, np.integer)):
        info["epoch"] = int(checkpoint["epoch"])
    if isinstance(checkpoint.get("best_metric"), (int, float, np.number)):
        info["best_metric"] = float(checkpoint["best_metric"])
    return info


def convert_original(
    original: dict, *, head: str = "auto", backbone: str | nn.Module = DEFAULT_BACKBONE, image_size: int = 256
) -> tuple[AestheticModel, dict[str, Any]]:
    """The :class:`AestheticModel` of a loaded original checkpoint, and plain facts about the original run.

    ``head='auto'`` takes the head the original run trained (see :func:`original_head`). ``backbone`` may be a
    built current-timm SwinV2 for a configuration timm does not register; the spec then names its
    architecture, so rebuilding the model needs that configuration again. A mismatch raises ValueError.
    """
    head = _resolve_head(original, head)
    net = _target_backbone(backbone)
    name = (
        backbone if isinstance(backbone, str) else net.pretrained_cfg.get("architecture", type(net).__name__)
    )
    state = convert_original_state_dict(original["state_dict"], net, head)
    with torch.device("meta"):  # built without memory, then given exactly the converted tensors
        model = AestheticModel(copy.deepcopy(net).to("meta"), _spec(head, name, net, image_size))
    model.load_state_dict(state, assign=True)
    return model, _provenance(original)
