"""RankSim: align the ranking of feature similarities with the ranking of label similarities.

Gong, Mori, Tung. "RankSim: Ranking Similarity Regularization for Deep Imbalanced Regression", ICML 2022.

On a subset of the batch that holds each MOS once (one random sample per distinct MOS), with
``S^f_ij = cos(f_i, f_j)`` and ``S^y_ij = −|s_i − s_j|``::

    L = Σ_i mean_j (rank(S^f_i)_j − rank(S^y_i)_j)²,    rank(v)_j = (1 + #{k: v_k > v_j}) / M

(M rows in the subset; the largest entry of a row has rank 1/M, ties go to the lower index). ``rank`` is
piecewise constant; its gradient is the blackbox-solver one (Vlastelica et al., "Differentiation of Blackbox
Combinatorial Solvers", ICLR 2020): for an incoming gradient g at v, ``(rank(v + λ g) − rank(v)) / λ``.
The total loss gains ``γ · L``. The sum over rows (not a mean) follows the reference's
``batchwise_ranking_regularizer`` (agedb-dir/ranksim.py), so the paper's γ keeps its meaning.

Defaults: γ = 100, λ = 2, the settings of every RankSim run in the reference (agedb-dir/README.md,
"Main Arguments"; the argparse defaults in agedb-dir/train.py are 0 and 1, i.e. RankSim off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from elta.enhancers.base import Enhancer, StepState, register_enhancer
from elta.errors import ConfigError

__all__ = ["rank_normalised", "BlackboxRank", "unique_label_subset", "ranksim_loss", "RankSim"]


def rank_normalised(x: torch.Tensor) -> torch.Tensor:
    """Descending ranks along the last dim, scaled to (0, 1]: the largest entry gets 1/n, the smallest 1.

    x: [..., n]. Ties are broken by position (the earlier entry ranks first). Returns float32 (float64 if
    x is), without gradient.
    """
    order = torch.argsort(x, dim=-1, descending=True, stable=True)
    ranks = torch.argsort(order, dim=-1)  # position of each entry in the sorted order
    dtype = torch.promote_types(x.dtype, torch.float32)
    return (ranks + 1).to(dtype) / x.shape[-1]


class BlackboxRank(torch.autograd.Function):
    """:func:`rank_normalised` with the blackbox-solver gradient ``(rank(x + λ g) − rank(x)) / λ``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, interpolation: float) -> torch.Tensor:
        ranks = rank_normalised(x)
        ctx.interpolation = interpolation
        ctx.save_for_backward(x, ranks)
        return ranks

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, ranks = ctx.saved_tensors
        perturbed = rank_normalised(x + ctx.interpolation * grad.to(x.dtype))
        return ((perturbed - ranks) / ctx.interpolation).to(x.dtype), None


def unique_label_subset(scores: torch.Tensor) -> torch.Tensor:
    """Indices [M] of one randomly chosen sample per distinct value of ``scores`` [B], in ascending order.

    A batch without repeated values gives ``arange(B)``. Draws from torch's default generator of the scores'
    device; ``torch.unique`` synchronises with the host (its output size depends on the data).
    """
    distinct, group = torch.unique(scores, return_inverse=True)
    n = scores.shape[0]
    perm = torch.randperm(n, device=scores.device)
    position = torch.empty_like(perm)
    position[perm] = torch.arange(n, device=scores.device)
    # In each group, the member that comes first in a random permutation wins.
    first = torch.full((distinct.numel(),), n, dtype=perm.dtype, device=scores.device)
    first = first.scatter_reduce(0, group, position, reduce="amin")
    return torch.sort(perm[first]).values


def ranksim_loss(features: torch.Tensor, scores: torch.Tensor, interpolation: float = 2.0) -> torch.Tensor:
    """``Σ_i mean_j (rank(S^f_i)_j − rank(S^y_i)_j)²`` over all rows given (no subsetting).

    features: [M, D]; scores: [M] labels on any scale; interpolation: the blackbox λ (> 0). Differentiable
    w.r.t. features (blackbox gradient); returns a float32 scalar (float64 if features are).
    """
    if features.shape[0] != scores.shape[0]:
        raise ValueError(
            f"ranksim_loss: {features.shape[0]} feature rows but {scores.shape[0]} scores; pass one per row"
        )
    dtype = torch.promote_types(features.dtype, torch.float32)
    f = F.normalize(features.to(dtype), dim=1)
    s = scores.to(device=f.device, dtype=dtype)
    feature_ranks = BlackboxRank.apply(f @ f.T, interpolation)
    label_ranks = rank_normalised(-(s.unsqueeze(1) - s.unsqueeze(0)).abs())
    return (feature_ranks - label_ranks).pow(2).mean(dim=1).sum()


@register_enhancer
class RankSim(Enhancer):
    """Add ``γ · L_RankSim`` on a unique-MOS subset of the batch (mixed rows included), before the head."""

    name = "ranksim"
    order = 70

    @dataclass
    class Settings:
        gamma: float = 100.0  # loss weight γ
        interpolation: float = 2.0  # blackbox λ

        def __post_init__(self) -> None:
            if self.gamma < 0:
                raise ConfigError(f"ranksim: gamma must be ≥ 0; got {self.gamma}")
            if self.interpolation <= 0:
                raise ConfigError(f"ranksim: interpolation must be > 0; got {self.interpolation}")

    def forward(self, state: StepState) -> StepState:
        keep = unique_label_subset(state.scores.to(state.features.device))
        loss = ranksim_loss(state.features[keep], state.scores[keep], self.cfg.interpolation)
        state.losses["ranksim"] = self.cfg.gamma * loss
        return state
