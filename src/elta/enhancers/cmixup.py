"""C-Mixup in feature space: mix each sample with a partner of similar MOS.

Yao, Wang, Li, Zhang, Liang, Zou, Finn. "C-Mixup: Improving Generalization in Regression", NeurIPS 2022.

For each anchor i, a partner j ≠ i is drawn with ``P(j | i) ∝ exp(−(s_i − s_j)² / (2h²))`` (a Gaussian kernel
of bandwidth h on the MOS), ``λ ~ Beta(α, α)`` once per step, and the mixed row is
``f̃ = λ f_i + (1 − λ) f_j``, with targets, MOS and weights mixed alike.

Adaptations, stated so results are read correctly:

- Mixing happens on pooled features (manifold mixup), the natural comparison with TFA; the reference mixes
  inputs or hidden layers (``--use_manifold``).
- Partners come from the batch; the reference draws them from the whole training set (src/algorithm.py,
  ``get_mixup_sample_rate``) and also allows j = i, which here would add a copy of the anchor.
- By default every sample of the batch anchors one mixed row, appended to the batch (``pairs = 0``), so
  the loss sees real and mixed rows; ``replace: true`` trains on the mixed rows only, as the reference does,
  and ``pairs = m`` mixes m anchors drawn without replacement (TFA's budget).

Defaults: α = 2 (``mix_alpha`` for all but one dataset, src/config.py); one λ per step as in src/algorithm.py
``train``. The bandwidth is tuned per dataset in the paper (0.05 to 10 label units, src/main.sh; argparse
default 1.0, src/main.py); here it is a fraction of the dataset's score range, default 0.05
(0.45 MOS on AVA's 1–10), not a value from the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from elta.enhancers.base import Enhancer, StepState, register_enhancer
from elta.errors import ConfigError
from elta.functional import mix_rows

__all__ = ["CMixupBatch", "cmixup_partner_probs", "mix_rows", "cmixup_mix", "CMixup"]


class CMixupBatch(NamedTuple):
    """The ``m`` mixed rows of a C-Mixup step and how they were made."""

    features: torch.Tensor  # [m, D]
    targets: torch.Tensor  # [m, K] or [m]
    scores: torch.Tensor  # [m] mixed MOS
    anchors: torch.Tensor  # [m] long, indices into the batch
    partners: torch.Tensor  # [m] long
    lam: torch.Tensor  # [m] weight of the anchor (one value per step, repeated)


def cmixup_partner_probs(scores: torch.Tensor, bandwidth: float, anchors: torch.Tensor) -> torch.Tensor:
    """``P(j | a) ∝ exp(−(s_a − s_j)² / (2h²))`` over ``j ≠ a`` for each anchor a.

    scores: [B] MOS (B ≥ 2); bandwidth: h in the same units (> 0); anchors: [m] long. Returns [m, B] in
    float32 (float64 if scores are), exactly 0 at ``j = a``, computed in log space (no underflow to 0/0).
    """
    s = scores.to(torch.promote_types(scores.dtype, torch.float32))
    logits = -(s[anchors].unsqueeze(1) - s.unsqueeze(0)).pow(2) / (2 * bandwidth**2)
    is_anchor = anchors.unsqueeze(1) == torch.arange(s.shape[0], device=s.device).unsqueeze(0)
    return torch.softmax(logits.masked_fill(is_anchor, float("-inf")), dim=1)


def cmixup_mix(
    features: torch.Tensor,
    targets: torch.Tensor,
    scores: torch.Tensor,
    bandwidth: float,
    alpha: float = 2.0,
    pairs: int = 0,
) -> CMixupBatch:
    """Draw anchors, partners and λ and return the mixed rows.

    features: [B, D]; targets: [B, K] distributions or [B] scalars; scores: [B] MOS; bandwidth in MOS units;
    pairs: number of mixed rows m (0 or ≥ B: every sample anchors one row, in batch order; otherwise m
    anchors without replacement). Needs B ≥ 2. Draws use torch's default generator of the features' device
    (``torch.multinomial``'s input checks may synchronise with the host). Differentiable w.r.t. features.
    """
    n = scores.shape[0]
    if n < 2:
        raise ValueError(f"cmixup_mix: a batch of {n} sample(s) has no partner to mix with; need ≥ 2")
    if features.shape[0] != n or targets.shape[0] != n:
        raise ValueError(
            f"cmixup_mix: batch sizes differ: features {tuple(features.shape)}, targets "
            f"{tuple(targets.shape)}, scores {tuple(scores.shape)}"
        )
    device = features.device
    scores = scores.to(device)
    m = n if pairs <= 0 else min(pairs, n)
    anchors = torch.arange(n, device=device) if m == n else torch.randperm(n, device=device)[:m]
    partners = torch.multinomial(cmixup_partner_probs(scores, bandwidth, anchors), 1).squeeze(1)
    a = torch.tensor(float(alpha), device=device)
    lam = torch.distributions.Beta(a, a).sample().expand(m)
    mixed = (mix_rows(x, anchors, partners, lam) for x in (features, targets.to(device), scores))
    return CMixupBatch(*mixed, anchors, partners, lam)


@register_enhancer
class CMixup(Enhancer):
    """Mix label-similar pairs in feature space; append the mixed rows (or replace the batch by them)."""

    name = "cmixup"
    order = 12

    @dataclass
    class Settings:
        alpha: float = 2.0  # λ ~ Beta(α, α)
        bandwidth: float = 0.05  # kernel bandwidth h as a fraction of the dataset's score range
        pairs: int = 0  # mixed rows per step; 0 = one per sample of the batch
        replace: bool = False  # True: train on the mixed rows only (the reference)

        def __post_init__(self) -> None:
            if self.alpha <= 0:
                raise ConfigError(f"cmixup: alpha must be > 0; got {self.alpha}")
            if self.bandwidth <= 0:
                raise ConfigError(
                    f"cmixup: bandwidth must be > 0 (a fraction of the score range); got {self.bandwidth}"
                )
            if self.pairs < 0:
                raise ConfigError(f"cmixup: pairs must be ≥ 0 (0 = the whole batch); got {self.pairs}")

    def forward(self, state: StepState) -> StepState:
        if state.scores.shape[0] < 2:
            return state
        lo, hi = state.score_range
        c = self.cfg
        mixed = cmixup_mix(
            state.features, state.targets, state.scores, c.bandwidth * (hi - lo), c.alpha, c.pairs
        )
        weights = mix_rows(state.weights, mixed.anchors, mixed.partners, mixed.lam)
        rows = (mixed.features, mixed.targets, mixed.scores, weights)
        if c.replace:
            state.indices = None  # no row is a real training sample any more
        else:
            batch = (state.features, state.targets, state.scores, state.weights)
            rows = tuple(torch.cat(pair) for pair in zip(batch, rows, strict=True))
        state.features, state.targets, state.scores, state.weights = rows
        return state
