"""ConR: a contrastive regulariser that pushes apart samples predicted alike but labelled apart.

Keramati, Meng, Evans. "ConR: Contrastive Regularizer for Deep Imbalanced Regression", ICLR 2024.

For an anchor i with labels y, predictions ŷ, window w and cosine similarities c_ij of the features:
positives ``P_i = {j ≠ i: |y_i − y_j| ≤ w}``; negatives ``N_i = {j: |y_i − y_j| > w and |ŷ_i − ŷ_j| ≤ w}``;
a negative's pushing weight ``S_ij = ω_i exp(e |y_i − y_j|)`` (ω = the per-sample weights)::

    D_i = Σ_{k∈P_i} exp(c_ik / t) + Σ_{k∈N_i} S_ik exp(c_ik / t)
    ℓ_i = −(1 / |P_i|) Σ_{j∈P_i} log(exp(c_ij / t) / D_i)
    L   = (1 / N) Σ_i ω_i ℓ_i  over the anchors with a positive and a negative (others count 0)

and the total loss gains ``β · L``. Predictions are treated as constants (the reference detaches them).
This follows ``ConR`` in agedb-dir/loss.py, with one difference: there D_i sums ``exp(c_ik / t · [k ∈ P_i])``
over every k, so each non-positive k (the anchor itself, negatives, all others) adds exp(0) = 1 to D_i, a
masking artefact; here D_i holds the positives and weighted negatives only, as the paper's formula.

Adaptation: the reference contrasts two augmented views of each image, so every anchor has a positive (its
other view). Here there is one view (plus any mixed rows), so an anchor counts only when the batch holds
another sample within the window; larger batches give ConR more anchors.

Defaults (agedb-dir/train.py argparse; the same in imdb-wiki-dir): β = 4, w = 1 year, e = 0.01 per year,
t = 0.07 (``ConR`` sets t = 0.07 whatever ``-t`` says). Ages span about 100 years, so here w and e are given
relative to the dataset's score range R = hi − lo: w = 0.01 R (0.09 MOS on AVA's 1–10) and e = 1.0 per R.
β = 4 was set against an L1 loss in years; this toolkit's main losses are about 100 times smaller, so β
usually needs lowering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from elta.enhancers.base import Enhancer, StepState, register_enhancer
from elta.errors import ConfigError

__all__ = ["conr_masks", "conr_loss", "ConR"]


def conr_masks(scores: torch.Tensor, preds: torch.Tensor, window: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative pairs [N, N] (bool) of each anchor (row).

    scores, preds: [N] on one scale; window: w in that scale. Positive: ``j ≠ i`` and ``|y_i − y_j| ≤ w``;
    negative: ``|y_i − y_j| > w`` and ``|ŷ_i − ŷ_j| ≤ w``.
    """
    label_dist = (scores.unsqueeze(1) - scores.unsqueeze(0)).abs()
    pred_dist = (preds.unsqueeze(1) - preds.unsqueeze(0)).abs()
    close = label_dist <= window
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    return close & ~eye, ~close & (pred_dist <= window)


def conr_loss(
    features: torch.Tensor,
    scores: torch.Tensor,
    preds: torch.Tensor,
    window: float,
    temperature: float = 0.07,
    push: float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ConR loss L (module docstring) of one batch.

    features: [N, D]; scores, preds: [N] labels and predictions on one scale (preds get no gradient); window:
    w in that scale; push: e per unit of that scale; weights: [N] ω or None (all 1). Differentiable w.r.t.
    features; returns a float32 scalar (float64 if features are), 0 when no anchor has both a positive and
    a negative.
    """
    n = features.shape[0]
    if scores.shape != (n,) or preds.shape != (n,):
        raise ValueError(
            f"conr_loss: need one score and one prediction per feature row ({n}); got "
            f"{tuple(scores.shape)} and {tuple(preds.shape)}"
        )
    dtype = torch.promote_types(features.dtype, torch.float32)
    f = F.normalize(features.to(dtype), dim=1)
    y = scores.to(device=f.device, dtype=dtype)
    p = preds.detach().to(device=f.device, dtype=dtype)
    w = torch.ones_like(y) if weights is None else weights.to(device=f.device, dtype=dtype)
    pos, neg = conr_masks(y, p, window)
    logits = f @ f.T / temperature
    # log of each term of D_i: c/t for positives, c/t + log S for negatives, −inf elsewhere.
    log_push = torch.log(w).unsqueeze(1) + push * (y.unsqueeze(1) - y.unsqueeze(0)).abs()
    terms = torch.where(pos, logits, torch.where(neg, logits + log_push, float("-inf")))
    counted = pos.any(dim=1) & neg.any(dim=1)
    # Rows that do not count get finite dummy terms, so no NaN reaches the gradient.
    log_denom = torch.logsumexp(torch.where(counted.unsqueeze(1), terms, 0.0), dim=1)
    mean_pos = (logits * pos).sum(dim=1) / pos.sum(dim=1).clamp_min(1)
    per_anchor = torch.where(counted, log_denom - mean_pos, 0.0)
    return (w * per_anchor).sum() / n


@register_enhancer
class ConR(Enhancer):
    """Add ``β · L_ConR`` on the head's input features, with the head's predictions (dataset scale)."""

    name = "conr"
    order = 75

    @dataclass
    class Settings:
        beta: float = 4.0  # loss weight β
        w: float = 0.01  # label / prediction window, as a fraction of the score range
        t: float = 0.07  # temperature
        e: float = 1.0  # pushing coefficient per score range: S = ω exp(e |Δy| / R)

        def __post_init__(self) -> None:
            if self.beta < 0:
                raise ConfigError(f"conr: beta must be ≥ 0; got {self.beta}")
            if self.w <= 0:
                raise ConfigError(f"conr: w must be > 0 (a fraction of the score range); got {self.w}")
            if self.t <= 0:
                raise ConfigError(f"conr: t must be > 0; got {self.t}")
            if self.e < 0:
                raise ConfigError(f"conr: e must be ≥ 0; got {self.e}")

    def after_head(self, state: StepState, out) -> StepState:
        lo, hi = state.score_range
        span = hi - lo
        c = self.cfg
        loss = conr_loss(state.features, state.scores, out.score, c.w * span, c.t, c.e / span, state.weights)
        state.losses["conr"] = c.beta * loss
        return state
