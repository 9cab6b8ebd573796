"""The aesthetics model: timm backbone → pooled features → optional neck → distribution or scalar head.

The heads (:mod:`elta.models.heads`) follow the ELTA release and own their training targets and loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from elta.models.backbones import backbone_data_config, create_backbone
from elta.models.heads import HEADS, ModelOutput, make_head

__all__ = ["ModelOutput", "ModelSpec", "AestheticModel", "build_model", "score_quantiles"]

QUANTILE_LEVELS = 101  # the 0th, 1st, ..., 100th percentile


def score_quantiles(scores: Sequence[float]) -> list[float]:
    """The 0th..100th percentiles (101 values, non-decreasing) of ``scores``, e.g. a training split's MOS."""
    values = np.asarray(scores, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return []
    return [float(q) for q in np.quantile(values, np.linspace(0.0, 1.0, QUANTILE_LEVELS))]


@dataclass
class ModelSpec:
    """Everything needed to rebuild the model and its input pipeline; stored in every checkpoint."""

    backbone: str
    head: str  # distribution | scalar
    centers: list[float]  # bin centres (distribution) — for a scalar head, the score range [lo, hi]
    score_range: list[float]
    image_size: int
    resize: int
    mean: list[float]
    std: list[float]
    interpolation: str = "bicubic"
    neck_dim: int = 0
    dropout: float = 0.75
    acc_threshold: float | None = None
    dataset_format: str = ""
    group_counts: dict[str, int] = field(default_factory=dict)  # training images per group (tail metrics)
    calibration: dict | None = None  # post-hoc map of the score (elta.calibration), set by `elta calibrate`
    score_quantiles: list[float] = field(default_factory=list)  # 101 percentiles of the training MOS, or []

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}; got {self.head!r}")

    @property
    def num_bins(self) -> int:
        return len(self.centers) if self.head == "distribution" else 0

    def percentile(self, scores: np.ndarray) -> np.ndarray | None:
        """Where ``scores`` fall among the training split's MOS, in percent (0..100; NaN stays NaN); None when the
        checkpoint does not record that distribution (trained before it was stored).

        Interpolated linearly between the stored percentiles; a score on a run of tied percentiles gets the
        middle of the run, so a score equal to every training label is the 50th percentile, not the 100th.
        """
        if len(self.score_quantiles) != QUANTILE_LEVELS:
            return None
        q = np.asarray(self.score_quantiles, dtype=np.float64)
        levels = np.linspace(0.0, 100.0, QUANTILE_LEVELS)
        s = np.asarray(scores, dtype=np.float64)
        low = np.interp(s, q, levels)  # np.interp picks the last of tied xp: the top of a run
        high = -np.interp(-s, -q[::-1], -levels[::-1])  # the same from above: the bottom of the run
        return (low + high) / 2.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> ModelSpec:
        return cls(**raw)


class AestheticModel(nn.Module):
    normalizes_input = False  # takes images normalised by the eval transform (an exported graph normalises)

    def __init__(self, backbone: nn.Module, spec: ModelSpec, loss: str | None = None) -> None:
        """``loss``: the scalar head's training loss, mse (default) or l1."""
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        dim = backbone.num_features
        if spec.neck_dim > 0:
            self.neck: nn.Module = nn.Sequential(nn.Linear(dim, spec.neck_dim), nn.ReLU(inplace=True))
            dim = spec.neck_dim
        else:
            self.neck = nn.Identity()
        self.head = make_head(spec.head, dim, spec.centers, spec.score_range, spec.dropout, loss)
        self.register_buffer("centers", torch.tensor(spec.centers, dtype=torch.float32), persistent=False)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features through the neck: [B, 3, H, W] -> [B, D]."""
        return self.neck(self.backbone(images))

    def forward_head(self, features: torch.Tensor) -> ModelOutput:
        return self.head(features)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        return self.forward_head(self.forward_features(images))


def build_model(
    backbone: str,
    head: str,
    centers: list[float],
    score_range: list[float],
    *,
    weights: str = "none",
    image_size: int | None = None,
    resize: int | None = None,
    neck_dim: int = 0,
    dropout: float = 0.75,
    acc_threshold: float | None = None,
    dataset_format: str = "",
    group_counts: dict[str, int] | None = None,
    score_quantiles: Sequence[float] = (),
    loss: str | None = None,
) -> AestheticModel:
    """Create the backbone (with ``weights``) and wrap it with the head for the dataset's scale.

    ``loss``: the scalar head's training loss (mse or l1); the distribution head trains with EMD."""
    net = create_backbone(backbone, weights=weights, image_size=image_size)
    data_cfg = backbone_data_config(net)
    size = image_size or data_cfg["input_size"]
    scale = {"centers": [float(c) for c in centers], "score_range": [float(v) for v in score_range]}
    resize = int(resize or round(size * 300 / 256))
    geometry = {"image_size": int(size), "resize": resize, "neck_dim": neck_dim, "dropout": dropout}
    pipeline = {key: data_cfg[key] for key in ("mean", "std", "interpolation")}
    quantiles = [float(q) for q in score_quantiles]
    facts = {"acc_threshold": acc_threshold, "dataset_format": dataset_format, "score_quantiles": quantiles}
    facts["group_counts"] = dict(group_counts or {})
    spec = ModelSpec(backbone, head, **scale, **geometry, **pipeline, **facts)
    return AestheticModel(net, spec, loss)
