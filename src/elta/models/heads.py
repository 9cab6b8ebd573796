"""The two heads of the ELTA release; each owns its training targets and its loss.

The distribution head is Linear(D, 64) → ReLU → Linear(64, K) → softmax over the K score bins, trained
towards the vote distribution with the earth mover's distance. The scalar head is Dropout → Linear(D, 1) →
sigmoid, trained towards the MOS scaled to [0, 1] with the squared (``mse``) or absolute (``l1``) error.
Both are ``nn.Sequential``, so their parameters keep the release's state-dict keys (``head.0.weight`` …).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elta.errors import ConfigError
from elta.functional import dist_std, dist_to_score, emd_loss
from elta.metrics import emd

__all__ = ["ModelOutput", "DistributionHead", "ScalarHead", "make_head", "resolve_loss", "HEADS"]

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


class DistributionHead(nn.Sequential):
    """Linear(D, 64) → ReLU → Linear(64, K) → softmax; the score is the mean over bin ``centers``."""

    def __init__(self, dim: int, centers: Sequence[float]) -> None:
        super().__init__(nn.Linear(dim, 64), nn.ReLU(inplace=True), nn.Linear(64, len(centers)))
        self.register_buffer("centers", torch.tensor(centers, dtype=torch.float32), persistent=False)

    def forward(self, features: torch.Tensor) -> ModelOutput:
        logits = super().forward(features)
        dist = torch.softmax(logits.float(), dim=1)
        return ModelOutput(features, dist_to_score(dist, self.centers), logits=logits, distribution=dist)

    def targets(self, mos: torch.Tensor, dist: torch.Tensor | None) -> torch.Tensor:
        """The vote distributions [B, K]."""
        return dist

    def loss(self, out: ModelOutput, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample EMD [B]."""
        return emd_loss(out.distribution, targets, reduction="none")

    def prediction_loss(
        self, score: np.ndarray, dist: np.ndarray, mos: np.ndarray, gt_dist: np.ndarray
    ) -> float:
        """The mean loss of predictions as inference returns them (score [N], dist [N, K]) on the labels."""
        return emd(dist, gt_dist)


class ScalarHead(nn.Sequential):
    """Dropout → Linear(D, 1) → sigmoid, a score in [0, 1] mapped onto ``score_range``."""

    def __init__(self, dim: int, dropout: float, score_range: Sequence[float], loss: str = "mse") -> None:
        super().__init__(nn.Dropout(dropout), nn.Linear(dim, 1))
        if loss not in ("mse", "l1"):
            raise ValueError(f"the scalar head trains with mse or l1; got {loss!r}")
        self.loss_name = loss
        self.register_buffer("score_range", torch.tensor(score_range, dtype=torch.float32), persistent=False)

    def forward(self, features: torch.Tensor) -> ModelOutput:
        unit = torch.sigmoid(super().forward(features).float().squeeze(1))
        lo, hi = self.score_range[0], self.score_range[1]
        return ModelOutput(features, lo + unit * (hi - lo), score_unit=unit)

    def targets(self, mos: torch.Tensor, dist: torch.Tensor | None = None) -> torch.Tensor:
        """The MOS [B] scaled to [0, 1]."""
        lo, hi = self.score_range[0], self.score_range[1]
        return (mos - lo) / (hi - lo)

    def loss(self, out: ModelOutput, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample squared or absolute error [B] on the [0, 1] scale."""
        error = F.mse_loss if self.loss_name == "mse" else F.l1_loss
        return error(out.score_unit, targets.to(out.score_unit.dtype), reduction="none")

    def prediction_loss(self, score: np.ndarray, dist, mos: np.ndarray, gt_dist=None) -> float:
        """The mean loss of predicted scores [N] on the labels ``mos`` [N] (both on the dataset's scale)."""
        lo, hi = (float(v) for v in self.score_range)
        diff = (score - mos) / (hi - lo)
        return float(np.mean(diff**2) if self.loss_name == "mse" else np.mean(np.abs(diff)))


def make_head(
    kind: str, dim: int, centers, score_range, dropout: float, loss: str | None = None
) -> nn.Module:
    """The ``kind`` head (distribution | scalar) on features of width ``dim``."""
    if kind == "distribution":
        return DistributionHead(dim, centers)
    return ScalarHead(dim, dropout, score_range, loss or "mse")


def resolve_loss(name: str, has_distribution: bool, scalar_for: Sequence[str] = ()) -> str:
    """The training loss for ``--loss name`` (auto | emd | mse | l1): ``emd`` trains the distribution head,
    ``mse`` and ``l1`` the scalar head. ``scalar_for`` names the enabled enhancers that need a scalar head;
    ``auto`` then picks ``mse``, as it does for a dataset without vote distributions."""
    if name == "emd" and scalar_for:
        raise ConfigError(
            f"--loss emd trains the distribution head, but {', '.join(scalar_for)} needs a scalar head: "
            "use --loss auto, mse or l1"
        )
    if name == "emd" and not has_distribution:
        raise ConfigError(
            "--loss emd needs vote distributions, and this dataset has only MOS: use --loss mse or l1"
        )
    if name == "auto":
        return "emd" if has_distribution and not scalar_for else "mse"
    return name
