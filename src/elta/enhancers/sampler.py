"""Tail-aware sampling: draw label-tail and minority-group images more often.

ELTA 2.0, the ELTA authors' extension in the International Journal of Computer Vision (IJCV), 2026, of
Liu, He, Ming, Xie, Ma. "ELTA: An Enhancer against Long-Tail for Aesthetics-oriented Models", ICML 2024.

Each training row gets the sampling weight (ELTA 2.0's additive rule)

    w = 1 + a · label_tail + b · group_tail + c · (label_tail and group_tail)

with a = 1, b = 2, c = 2 as in the release: a head row 1, a label-tail row 2, a minority-group row 3, a row in
both tails 6. A row is in the label tail when its MOS is ≤ p20 or ≥ p80 of the training MOS (numpy's linear
percentiles; the rule of the evaluation's low / high buckets), and in the group tail when its group is a
minority: fewer training rows than ``ratio`` (0.2) × the largest group's (the rule of the evaluation's
group tail; rows without a group, "", are never in it). The trainer then draws n rows with replacement,
each with probability ∝ w, every epoch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from elta.enhancers.base import Enhancer, TrainingContext, register_enhancer
from elta.errors import ConfigError
from elta.metrics import minority_groups

__all__ = ["TailSampler", "label_tail", "group_tail", "tail_sample_weights"]


def label_tail(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """Bool [N]: MOS ≤ the 20th or ≥ the 80th percentile of ``scores`` (linear interpolation)."""
    values = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    if values.size == 0:
        return np.zeros(0, dtype=bool)
    p20, p80 = np.percentile(values, [20, 80])
    return (values <= p20) | (values >= p80)


def group_tail(groups: list[str], ratio: float = 0.2) -> np.ndarray:
    """Bool [N]: the row's group has fewer rows than ``ratio`` × the largest group's ("" never counts)."""
    minority = minority_groups(Counter(groups), ratio)
    return np.array([g in minority for g in groups], dtype=bool)


def tail_sample_weights(
    scores: np.ndarray | torch.Tensor,
    groups: list[str],
    a: float = 1.0,
    b: float = 2.0,
    c: float = 2.0,
    ratio: float = 0.2,
) -> torch.Tensor:
    """Sampling weights [N] (float64): 1 + a·[label tail] + b·[group tail] + c·[both] (the terms add up)."""
    labels = label_tail(scores)
    if len(groups) != len(labels):
        raise ValueError(
            f"tail-sampler: {len(labels)} scores but {len(groups)} groups; give one group per row"
        )
    minority = group_tail(groups, ratio)
    weights = 1.0 + a * labels + b * minority + c * (labels & minority)
    return torch.as_tensor(weights, dtype=torch.float64)


@register_enhancer
class TailSampler(Enhancer):
    """Sample label-tail and minority-group training rows more often; changes no step's tensors."""

    name = "tail-sampler"
    order = 1

    @dataclass
    class Settings:
        a: float = 1.0  # added to a label-tail row's weight
        b: float = 2.0  # added to a minority-group row's weight
        c: float = 2.0  # added on top of a and b to a row in both tails
        ratio: float = 0.2  # minority: fewer rows than ratio × the largest group's

        def __post_init__(self) -> None:
            if min(self.a, self.b, self.c) < 0:
                raise ConfigError(f"tail-sampler: a, b and c must be ≥ 0; got {self.a}, {self.b}, {self.c}")
            if not 0 < self.ratio <= 1:
                raise ConfigError(
                    f"tail-sampler: ratio must be in (0, 1] (0.2 in ELTA 2.0); got {self.ratio}"
                )

    def sample_weights(self, context: TrainingContext) -> torch.Tensor:
        c = self.cfg
        return tail_sample_weights(context.scores, context.groups, c.a, c.b, c.c, c.ratio)
