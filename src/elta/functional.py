"""The paper's math as pure torch functions.

Liu, He, Ming, Xie, Ma. "ELTA: An Enhancer against Long-Tail for Aesthetics-oriented Models", ICML 2024.
Every function works on any device, keeps the batch on it, and is differentiable where that makes sense.
"""

from __future__ import annotations

import torch

__all__ = ["dist_to_score", "dist_std", "emd_loss"]


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


def emd_loss(pred: torch.Tensor, target: torch.Tensor, r: float = 2.0) -> torch.Tensor:
    """Earth mover's distance between ordered distributions (NIMA's definition).

    Per sample ``(mean_k |CDF_pred(k) − CDF_target(k)|^r)^(1/r)``, then the mean over the batch.
    pred, target: [B, K] probabilities. The original release took one root of the mean over the whole
    batch instead, which weights samples differently; this is the per-sample form the papers state.
    """
    if pred.shape != target.shape:
        raise ValueError(f"emd_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    cdf_diff = torch.cumsum(pred, dim=1) - torch.cumsum(target.to(pred.dtype), dim=1)
    per_sample = cdf_diff.abs().pow(r).mean(dim=1)
    # The root has an infinite gradient at 0: a tiny floor keeps a perfect prediction's gradient finite.
    return per_sample.clamp_min(1e-20).pow(1.0 / r).mean()
