"""The aesthetics model: timm backbone → pooled features → optional neck → distribution or scalar head.

Heads follow the ELTA release: the distribution head is Linear(D, 64) → ReLU → Linear(64, K) → softmax,
trained with EMD; the scalar head is Dropout → Linear(D, 1) → sigmoid on the MOS scaled to [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from elta.functional import dist_std, dist_to_score
from elta.models.backbones import backbone_data_config, create_backbone

__all__ = ["ModelOutput", "ModelSpec", "AestheticModel", "build_model"]

HEADS = ("distribution", "scalar")


@dataclass
class ModelOutput:
    """What a forward pass returns. Shapes for a batch of B images and K bins."""

    features: torch.Tensor  # [B, D] pooled (after the neck, when there is one)
    score: torch.Tensor  # [B] MOS on the dataset's scale
    logits: torch.Tensor | None = None  # [B, K] distribution head only
    distribution: torch.Tensor | None = None  # [B, K] softmax of logits
    score_unit: torch.Tensor | None = None  # [B] scalar head only: sigmoid output in [0, 1]

    def score_std(self, centers: torch.Tensor) -> torch.Tensor | None:
        """Spread of the predicted distribution over the bin centres, or None for a scalar head."""
        return None if self.distribution is None else dist_std(self.distribution, centers)


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

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}; got {self.head!r}")

    @property
    def num_bins(self) -> int:
        return len(self.centers) if self.head == "distribution" else 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> ModelSpec:
        return cls(**raw)


class AestheticModel(nn.Module):
    def __init__(self, backbone: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        dim = backbone.num_features
        if spec.neck_dim > 0:
            self.neck: nn.Module = nn.Sequential(nn.Linear(dim, spec.neck_dim), nn.ReLU(inplace=True))
            dim = spec.neck_dim
        else:
            self.neck = nn.Identity()
        if spec.head == "distribution":
            self.head = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(inplace=True), nn.Linear(64, spec.num_bins))
        else:
            self.head = nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(dim, 1))
        self.register_buffer("centers", torch.tensor(spec.centers, dtype=torch.float32), persistent=False)
        self.register_buffer(
            "score_range", torch.tensor(spec.score_range, dtype=torch.float32), persistent=False
        )

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features through the neck: [B, 3, H, W] -> [B, D]."""
        return self.neck(self.backbone(images))

    def forward_head(self, features: torch.Tensor) -> ModelOutput:
        out = self.head(features)
        if self.spec.head == "distribution":
            dist = torch.softmax(out.float(), dim=1)
            return ModelOutput(features, dist_to_score(dist, self.centers), logits=out, distribution=dist)
        unit = torch.sigmoid(out.float().squeeze(1))
        lo, hi = self.score_range[0], self.score_range[1]
        return ModelOutput(features, lo + unit * (hi - lo), score_unit=unit)

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
) -> AestheticModel:
    """Create the backbone (with ``weights``) and wrap it with the head for the dataset's scale."""
    net = create_backbone(backbone, weights=weights, image_size=image_size)
    data_cfg = backbone_data_config(net)
    size = image_size or data_cfg["input_size"]
    spec = ModelSpec(
        backbone=backbone,
        head=head,
        centers=[float(c) for c in centers],
        score_range=[float(v) for v in score_range],
        image_size=int(size),
        resize=int(resize or round(size * 300 / 256)),
        mean=data_cfg["mean"],
        std=data_cfg["std"],
        interpolation=data_cfg["interpolation"],
        neck_dim=neck_dim,
        dropout=dropout,
        acc_threshold=acc_threshold,
        dataset_format=dataset_format,
        group_counts=dict(group_counts or {}),
    )
    return AestheticModel(net, spec)
