"""The paper's math as pure torch functions.

Liu, He, Ming, Xie, Ma. "ELTA: An Enhancer against Long-Tail for Aesthetics-oriented Models", ICML 2024.
Every function works on any device, keeps the batch on it, and is differentiable where that makes sense.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "dist_to_score",
    "dist_std",
    "emd_loss",
    "TFAMix",
    "ava_units",
    "tfa_anchor_probs",
    "tfa_partner_probs",
    "tfa_mix",
    "mix_rows",
    "flsa_loss",
    "apds_sharpen",
    "apds_select",
]


def dist_to_score(dist: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Mean opinion score of distributions: ``Σ_k p_k · c_k``.

    dist: [B, K] probabilities; centers: [K] bin centres on the dataset's scale. Returns [B].
    """
    return dist @ centers.to(dtype=dist.dtype, device=dist.device)


def dist_std(dist: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Standard deviation of each distribution over the bin centres. [B, K] -> [B]."""
    centers = centers.to(dtype=dist.dtype, device=dist.device)
    mean = dist @ centers
    var = (dist * (centers.unsqueeze(0) - mean.unsqueeze(1)) ** 2).sum(dim=1)
    return var.clamp_min(0).sqrt()


def emd_loss(
    pred: torch.Tensor, target: torch.Tensor, r: float = 2.0, reduction: str = "mean"
) -> torch.Tensor:
    """Earth mover's distance between ordered distributions (NIMA's definition).

    Per sample ``(mean_k |CDF_pred(k) − CDF_target(k)|^r)^(1/r)``, then the mean over the batch
    (``reduction="none"`` returns the [B] per-sample values). pred, target: [B, K] probabilities.
    The original release took one root of the mean over the whole batch instead, which weights samples
    differently; this is the per-sample form the papers state.
    """
    if pred.shape != target.shape:
        raise ValueError(f"emd_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    cdf_diff = torch.cumsum(pred, dim=1) - torch.cumsum(target.to(pred.dtype), dim=1)
    per_sample = cdf_diff.abs().pow(r).mean(dim=1)
    # The root has an infinite gradient at 0: a tiny floor keeps a perfect prediction's gradient finite.
    per_sample = per_sample.clamp_min(1e-20).pow(1.0 / r)
    return per_sample if reduction == "none" else per_sample.mean()


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32, or as float64 when it already is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# --- TFA: tail feature augmentation -------------------------------------------------------------------------


class TFAMix(NamedTuple):
    """A batch with ``m`` mixed rows appended (see :func:`tfa_mix`)."""

    features: torch.Tensor  # [B + m, D]
    targets: torch.Tensor  # [B + m, K] or [B + m]
    scores: torch.Tensor  # [B + m], the mixed rows carry the mixed MOS
    anchors: torch.Tensor  # [m] long, indices into the original batch
    partners: torch.Tensor  # [m] long
    lam: torch.Tensor  # [m], weight of the anchor


AVA_SPAN = 9.0  # hi − lo of AVA's 1–10 scale, on which τ1, τ2, ε and APDS's β were tuned


def ava_units(score_range: Sequence[float] | None) -> float:
    """Factor that turns a score difference on ``score_range`` = (lo, hi) into AVA-equivalent units.

    ``9 / (hi − lo)``: exactly 1 on AVA's 1–10 scale, 9 on AADB's 0–1, 0.09 on 0–100. ``None`` means the
    differences are already in AVA units (factor 1).
    """
    if score_range is None:
        return 1.0
    lo, hi = (float(v) for v in score_range)
    if not hi > lo:
        raise ValueError(f"score_range must have hi > lo; got ({lo}, {hi})")
    return AVA_SPAN / (hi - lo)


def _anchor_logits(scores: torch.Tensor, tau1: float, score_range: Sequence[float] | None) -> torch.Tensor:
    """``|s̄ − s_i| / τ1`` with the distance in AVA units: [B] -> [B], float32 or float64."""
    s = _at_least_float32(scores)
    return (s.mean() - s).abs() * ava_units(score_range) / tau1


def tfa_anchor_probs(
    scores: torch.Tensor, tau1: float, score_range: Sequence[float] | None = None
) -> torch.Tensor:
    """Anchor probabilities ``P(i) = softmax_i(|s̄ − s_i| / τ1)``, s̄ the batch mean.

    scores: [B] MOS; score_range: the dataset's (lo, hi), so that distances are measured in AVA-equivalent
    units (:func:`ava_units`; ``None``: as given). Returns [B] in float32 (float64 if scores are).
    """
    return torch.softmax(_anchor_logits(scores, tau1, score_range), dim=0)


def _partner_logits(
    scores: torch.Tensor, anchors: torch.Tensor, tau2: float, eps: float, score_range: Sequence[float] | None
) -> torch.Tensor:
    """``τ2 / (|s_a − s_j| + ε)`` for each anchor ``a``: [B] scores, [m] anchors -> [m, B], −inf at ``j = a``."""
    s = _at_least_float32(scores)
    gap = (s[anchors].unsqueeze(1) - s.unsqueeze(0)).abs() * ava_units(score_range)
    # Kept as logits, never exp(τ2 / ε) itself: that overflows float64 once τ2 > ~7.1 with a tie.
    is_anchor = anchors.unsqueeze(1) == torch.arange(s.shape[0], device=s.device).unsqueeze(0)
    return (tau2 / (gap + eps)).masked_fill(is_anchor, float("-inf"))


def tfa_partner_probs(
    scores: torch.Tensor,
    anchor: int,
    tau2: float,
    eps: float = 0.01,
    score_range: Sequence[float] | None = None,
) -> torch.Tensor:
    """Partner probabilities ``P(j | a) ∝ exp(τ2 / (|s_a − s_j| + ε))`` over ``j ≠ a``; exactly 0 at ``j = a``.

    scores: [B] MOS (B ≥ 2); anchor: index a in [−B, B); score_range as in :func:`tfa_anchor_probs` (ε is in
    AVA units too). Returns [B] in float32 (float64 if scores are), computed in log space, so ties stay
    finite for any τ2.
    """
    n = scores.shape[0]
    if not -n <= anchor < n:
        raise IndexError(f"tfa_partner_probs: anchor {anchor} out of range for a batch of {n}")
    anchors = torch.tensor([anchor % n], device=scores.device)
    return torch.softmax(_partner_logits(scores, anchors, tau2, eps, score_range)[0], dim=0)


def _gumbel_top_k(logits: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """``k`` indices drawn without replacement from ``softmax(logits)`` along the last dim (Gumbel-top-k).

    Works on the logits, so a row whose probability underflows to 0 in a softmax keeps its true (tiny)
    chance, and a −inf logit is never drawn while a finite one is left. Returns long [..., k].
    """
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    # −log(−log u) is Gumbel(0, 1); u = 0 gives −inf, which only puts that row last.
    keys = logits - torch.log(-torch.log(u))
    return keys.topk(k, dim=-1).indices


def mix_rows(
    x: torch.Tensor, anchors: torch.Tensor, partners: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """Rows ``λ x_a + (1 − λ) x_p`` of ``x`` [B, ...] for [m] anchors and partners; keeps a float dtype."""
    w = lam.to(x.device).reshape(-1, *([1] * (x.dim() - 1)))
    mixed = w * x[anchors.to(x.device)] + (1 - w) * x[partners.to(x.device)]
    return mixed.to(x.dtype) if x.is_floating_point() else mixed


def tfa_mix(
    features: torch.Tensor,
    targets: torch.Tensor,
    scores: torch.Tensor,
    tau1: float,
    tau2: float,
    num_pairs: int = 1,
    generator: torch.Generator | None = None,
    score_range: Sequence[float] | None = None,
) -> TFAMix:
    """Tail feature augmentation: mix ``m`` drawn (anchor, partner) pairs and append them to the batch.

    features: [B, D]; targets: [B, K] distributions or [B] scalars; scores: [B] MOS; score_range: the
    dataset's (lo, hi), to measure score distances in AVA-equivalent units (see :func:`ava_units`). Anchors
    are drawn without replacement from :func:`tfa_anchor_probs`, each one's partner from
    :func:`tfa_partner_probs` (ε = 0.01), both by Gumbel-top-k on the logits, and
    ``λ = P(a) / (P(a) + P(p)) = sigmoid((d_a − d_p) / τ1)`` with d = |s̄ − s|, which stays finite when the
    probabilities underflow. ``m = min(num_pairs, B)``; a batch of fewer than 2 samples (or
    ``num_pairs = 0``) comes back unchanged with empty anchors. Everything stays on the input device without
    a copy to the host; ``generator``, if given, must live on that same device. Differentiable w.r.t.
    features (and targets).
    """
    if num_pairs < 0:
        raise ValueError(f"tfa_mix: num_pairs must be >= 0, got {num_pairs}")
    n = scores.shape[0]
    if features.shape[0] != n or targets.shape[0] != n:
        raise ValueError(
            f"tfa_mix: batch sizes differ: features {tuple(features.shape)}, targets {tuple(targets.shape)}, "
            f"scores {tuple(scores.shape)}"
        )
    m = min(num_pairs, n)
    if n < 2 or m == 0:
        empty = torch.empty(0, dtype=torch.long, device=scores.device)
        lam = torch.empty(0, dtype=_at_least_float32(scores).dtype, device=scores.device)
        return TFAMix(features, targets, scores, empty, empty, lam)
    anchor_logits = _anchor_logits(scores, tau1, score_range)
    anchors = _gumbel_top_k(anchor_logits, m, generator)
    partner_logits = _partner_logits(scores, anchors, tau2, 0.01, score_range)
    partners = _gumbel_top_k(partner_logits, 1, generator).squeeze(1)
    lam = torch.sigmoid(anchor_logits[anchors] - anchor_logits[partners])
    appended = []
    for x in (features, targets, scores):  # the mixed rows appended; floating inputs keep their dtype
        mixed = mix_rows(x, anchors, partners, lam)
        appended.append(torch.cat([x.to(mixed.dtype), mixed]))
    return TFAMix(*appended, anchors, partners, lam)


# --- FLSA: feature–label similarity alignment ---------------------------------------------------------------


def flsa_loss(features: torch.Tensor, scores: torch.Tensor, score_range: float | None = None) -> torch.Tensor:
    """Mean over all pairs (i, j) of ``(cos(f_i, f_j) − (1 − |s_i − s_j| / R))²``.

    features: [B, D]; scores: [B] MOS. R is the batch's max − min score, or ``score_range`` (the dataset's
    hi − lo, same units as scores) when given; with R = 0 the label similarity is 1 everywhere.
    Returns a scalar in float32 (float64 if the features are), whatever the features' dtype or autocast.
    """
    if score_range is not None and score_range <= 0:
        raise ValueError(f"flsa_loss: score_range must be > 0, got {score_range}")
    f = F.normalize(_at_least_float32(features), dim=1)
    # Autocast would run the matmul in bf16/fp16 again; cosines near 1 need the full float32 mantissa.
    with torch.autocast(f.device.type, enabled=False):
        feature_sim = f @ f.T
    s = scores.to(device=f.device, dtype=f.dtype)
    r = (
        s.max() - s.min()
        if score_range is None
        else torch.tensor(score_range, dtype=f.dtype, device=f.device)
    )
    gap = (s.unsqueeze(1) - s.unsqueeze(0)).abs()
    # A batch of equal scores has R = 0: every pair is then fully similar. Divide by a safe R so that
    # neither the value nor the gradient of the unused branch is NaN.
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    label_sim = torch.where(r > 0, 1 - gap / safe_r, torch.ones_like(gap))
    return (feature_sim - label_sim).pow(2).mean()


# --- APDS: adaptive pseudo-label distribution sharpening ----------------------------------------------------


def apds_sharpen(
    logits: torch.Tensor,
    scores: torch.Tensor,
    beta: float,
    center: float | torch.Tensor | None = None,
    score_range: Sequence[float] | None = None,
) -> torch.Tensor:
    """Sharpened distributions ``q = softmax(z · exp(β · |c − ŝ|))``.

    logits: [B, K]; scores: [B] predicted MOS; center c on the same scale (default: mean of ``scores``);
    score_range: the scale's (lo, hi), so that |c − ŝ| is measured in AVA-equivalent units
    (:func:`ava_units`; ``None``: as given). Returns [B, K] in float32 (float64 if the logits are).
    """
    z = _at_least_float32(logits)
    s = scores.to(device=z.device, dtype=z.dtype)
    c = s.mean() if center is None else torch.as_tensor(center, dtype=z.dtype, device=z.device)
    temperature = torch.exp(beta * (c - s).abs() * ava_units(score_range))
    return torch.softmax(z * temperature.unsqueeze(1), dim=1)


def apds_select(
    logits: torch.Tensor,
    scores: torch.Tensor,
    beta: float,
    threshold: float,
    center: float | torch.Tensor | None = None,
    score_range: Sequence[float] | None = None,
) -> torch.Tensor:
    """Which samples to pseudo-label: ``max_k q_k > threshold`` with q from :func:`apds_sharpen`. Bool [B]."""
    return apds_sharpen(logits, scores, beta, center, score_range).amax(dim=1) > threshold
