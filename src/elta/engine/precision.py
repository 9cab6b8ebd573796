"""Mixed precision, memory format and compilation: the ``--amp``, ``--channels-last`` and ``--compile`` switches.

Autocast covers the model up to the pooled features; the head, the enhancers and every loss run in float32
on ``features.float()``, so EMD, FLSA and the other loss math never see bf16 or fp16 values.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from elta.errors import ConfigError, UnavailableError
from elta.models.model import AestheticModel

__all__ = ["Precision", "resolve_amp", "compile_backbone"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp name`` on ``device``; None = float32 throughout.

    ``auto`` is bf16 on CUDA GPUs that support it and off elsewhere. fp16 needs a CUDA GPU; bf16 runs on
    CUDA GPUs with bf16 support and on the CPU.
    """
    if name == "off" or (name == "auto" and device.type != "cuda"):
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if name not in _DTYPES:
        raise ConfigError(f"--amp must be one of auto, bf16, fp16, off; got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"--amp fp16 needs a CUDA GPU (fp16 autocast is for GPUs); on {device.type} use --amp bf16 or off"
        )
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--amp bf16: this GPU does not support bfloat16; use --amp fp16 or off")
    if name == "bf16" and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"--amp bf16 runs on CUDA GPUs and the CPU, not on {device.type}; use --amp off")
    return _DTYPES[name]


@dataclass(frozen=True)
class Precision:
    """How the model runs on ``device``: autocast dtype (None = float32) and memory format of the images."""

    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def create(cls, amp: str, device: torch.device, channels_last: bool = False) -> Precision:
        return cls(device, resolve_amp(amp, device), channels_last)

    @property
    def name(self) -> str:
        amp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return amp + (", channels-last" if self.channels_last else "")

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler for fp16 (gradients underflow without it); a pass-through otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def prepare(self, model: AestheticModel) -> AestheticModel:
        """The model in this precision's memory format (in place)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def features(self, fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        """``fn(inputs)`` under autocast, as float32. Images [B, 3, H, W] go channels-last when asked."""
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with nullcontext() if self.dtype is None else torch.autocast(self.device.type, dtype=self.dtype):
            out = fn(inputs)
        return out.float()


def compile_backbone(model: AestheticModel) -> None:
    """``torch.compile`` the backbone in place (parameter names, and so checkpoints, are unchanged)."""
    try:
        supported = torch._dynamo.is_dynamo_supported()
    except AttributeError:  # a PyTorch without the compiler stack
        supported = False
    if not supported:
        raise UnavailableError(
            f"--compile: torch.compile is not available with PyTorch {torch.__version__} on this Python; "
            "drop --compile"
        )
    model.backbone.compile()
