"""Feature distribution smoothing (FDS): re-calibrate features with statistics smoothed across label bins.

Yang, Zha, Chen, Wang, Katabi. "Delving into Deep Imbalanced Regression", ICML 2021.

Per label bin b the running mean μ_b and diagonal variance σ²_b of the pooled features are tracked over
epochs and smoothed across bins with the LDS kernel k: μ̃ = k ∗ μ, σ̃² = k ∗ σ² (Eq. 3). A training
sample of bin b then has its features re-calibrated before the head (Eq. 4):

    f' = (f − μ_b) · sqrt(clip((σ̃²_b + ε) / (σ²_b + ε), 0.1, 10)) + μ̃_b

The clip bounds the variance ratio, as the paper's code does. Statistics are updated once an epoch from
that epoch's features: during the epoch each real row's detached features are accumulated per bin (count,
mean and sum of squared deviations, merged batch by batch with Chan et al.'s parallel update); at the
epoch's end the epoch's mean and unbiased variance enter the running statistics with momentum m,
μ_b ← (1 − m) · μ_epoch + m · μ_b (m = 0.9; a bin's first statistics are taken as they are), and the
smoothed statistics are recomputed. Calibration starts at epoch ``start_smooth`` (0-based; default 1,
the paper's code's start_update = 0, start_smooth = 1).

Defaults from the paper's code: Gaussian kernel, ks = 5, σ = 2 (bins), momentum 0.9, clip [0.1, 10].
Bins: ``bin_width`` as in LDS (default: 50 bins across the score range).

Smoothing across bins differs from the paper's code in one respect: its code pads the bin axis by
reflection and smooths every bin, including bins no sample has reached, whose initial statistics (mean 0,
variance 1) then leak into their neighbours. Aesthetic scales have empty bins at both ends, next to the
tail bins this method is meant to help, so here each smoothed value is the kernel-weighted mean over the
neighbouring bins that hold statistics (zero padding, the kernel renormalised over those bins).

In a distributed run the statistics are accumulated over the global batch (the rows of every process,
gathered), so that all processes re-calibrate with the same statistics as a single process would.

FDS acts only in training: the trainer calls enhancers on training steps, never at inference. Rows of a
bin without statistics, and feature dimensions with zero variance in their bin, pass unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from elta.enhancers.base import Enhancer, StepState, TrainingContext, register_enhancer
from elta.enhancers.lds import BinKernelSettings, bin_edges, bin_index, lds_kernel
from elta.errors import ConfigError

__all__ = ["FDS", "smooth_bins", "fds_calibrate"]

# the per-bin feature statistics FDS keeps in buffers, [bins, D] each
_STATISTICS = ("running_mean", "running_var", "smoothed_mean", "smoothed_var", "epoch_mean", "epoch_m2")


def smooth_bins(
    values: torch.Tensor, kernel: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Smooth per-bin statistics [B, D] along the bins with ``kernel`` [ks] (odd, symmetric).

    Each output is the kernel-weighted mean of the bins within reach that are ``valid`` [B] (bool; None =
    all): out_b = Σ_j k_j v_(b+j) / Σ_j k_j over valid b+j inside 0..B−1. Bins with no valid bin in reach
    keep their values.
    """
    if kernel.ndim != 1 or kernel.numel() % 2 == 0:
        raise ValueError(
            f"smooth_bins: kernel must be 1-D with an odd length; got shape {tuple(kernel.shape)}"
        )
    mask = torch.ones_like(values[:, 0]) if valid is None else valid.to(values.dtype)
    weight = kernel.to(values.dtype).view(1, 1, -1)
    half = kernel.numel() // 2
    numerator = F.conv1d((values * mask[:, None]).T.unsqueeze(1), weight, padding=half).squeeze(1).T
    denominator = F.conv1d(mask.view(1, 1, -1), weight, padding=half).view(-1, 1)
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-12), values)


def fds_calibrate(
    features: torch.Tensor,
    bins: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    smooth_mean: torch.Tensor,
    smooth_var: torch.Tensor,
    eps: float = 1e-5,
    clip: tuple[float, float] = (0.1, 10.0),
) -> torch.Tensor:
    """Re-calibrated features [N, D]: (f − μ_b) · sqrt(clip((σ̃²_b + ε) / (σ²_b + ε))) + μ̃_b.

    ``bins`` [N] the rows' label bins; statistics [B, D]. Dimensions whose σ²_b is 0 (no spread seen,
    or no statistics yet) are returned unchanged.
    """
    m1, v1, m2, v2 = mean[bins], var[bins], smooth_mean[bins], smooth_var[bins]
    ratio = ((v2 + eps) / (v1 + eps)).clamp(clip[0], clip[1])
    calibrated = (features - m1) * ratio.sqrt() + m2
    return torch.where(v1 > 0, calibrated, features)


@register_enhancer
class FDS(Enhancer):
    """Track per-bin feature statistics each epoch and re-calibrate the real rows' features from then on."""

    name = "fds"
    order = 6

    @dataclass
    class Settings(BinKernelSettings):
        momentum: float = 0.9  # weight of the previous running statistics
        start_smooth: int = 1  # first (0-based) epoch whose features are re-calibrated
        clip_min: float = 0.1  # bounds of the variance ratio
        clip_max: float = 10.0

        def __post_init__(self) -> None:
            self.check("fds")
            if not 0 <= self.momentum < 1:
                raise ConfigError(f"fds: momentum must be in [0, 1) (0.9 in the paper); got {self.momentum}")
            if self.start_smooth < 0:
                raise ConfigError(f"fds: start_smooth must be a 0-based epoch ≥ 0; got {self.start_smooth}")
            if not 0 < self.clip_min <= 1 <= self.clip_max:
                raise ConfigError(
                    f"fds: need 0 < clip_min ≤ 1 ≤ clip_max (0.1 and 10 in the paper); "
                    f"got {self.clip_min}, {self.clip_max}"
                )

    def setup(self, context: TrainingContext) -> None:
        c = self.cfg
        edges = torch.as_tensor(bin_edges(context.score_range, c.bin_width), dtype=torch.float32)
        bins, dim = len(edges) - 1, context.feature_dim
        self.register_buffer("edges", edges, persistent=False)
        kernel = torch.as_tensor(lds_kernel(c.kernel, c.ks, c.sigma), dtype=torch.float32)
        self.register_buffer("kernel", kernel, persistent=False)
        for name in _STATISTICS:
            self.register_buffer(name, torch.zeros(bins, dim))  # [bins, D]
        self.register_buffer("tracked", torch.zeros(bins))  # samples that entered each bin's statistics
        self.register_buffer("epoch_count", torch.zeros(bins))  # this epoch's samples so far

    def forward(self, state: StepState) -> StepState:
        if not hasattr(self, "running_mean"):
            raise RuntimeError("fds: setup(context) must run before the first step (the trainer calls it)")
        real = len(state.indices) if state.indices is not None else len(state.features)
        features = state.features[:real]
        if features.shape[1] != self.running_mean.shape[1]:
            raise ValueError(
                f"fds: features have {features.shape[1]} dimensions, setup was told {self.running_mean.shape[1]} "
                "(TrainingContext.feature_dim)"
            )
        bins = bin_index(state.scores[:real].to(self.edges.dtype), self.edges)
        if self.training:  # statistics of the global batch: every process holds the same ones
            seen = state.gather(features.detach().to(self.epoch_mean.dtype))
            self._accumulate(seen, state.gather(bins))
        if state.epoch >= self.cfg.start_smooth:
            stats = (self.running_mean, self.running_var, self.smoothed_mean, self.smoothed_var)
            clip = (self.cfg.clip_min, self.cfg.clip_max)
            calibrated = fds_calibrate(features, bins, *(s.to(features.dtype) for s in stats), clip=clip)
            state.features = torch.cat([calibrated, state.features[real:]])
        return state

    @torch.no_grad()
    def _accumulate(self, features: torch.Tensor, bins: torch.Tensor) -> None:
        """Merge one batch's per-bin count, mean and squared deviations into this epoch's (Chan et al.)."""
        count = torch.bincount(bins, minlength=len(self.epoch_count)).to(self.epoch_count.dtype)
        sums = torch.zeros_like(self.epoch_mean).index_add_(0, bins, features)
        mean = sums / count.clamp_min(1)[:, None]
        m2 = torch.zeros_like(self.epoch_m2).index_add_(0, bins, (features - mean[bins]) ** 2)
        before = self.epoch_count
        total = before + count
        delta = mean - self.epoch_mean
        self.epoch_mean += delta * (count / total.clamp_min(1))[:, None]
        self.epoch_m2 += m2 + delta**2 * (before * count / total.clamp_min(1))[:, None]
        self.epoch_count.copy_(total)

    @torch.no_grad()
    def on_epoch_end(self, epoch: int) -> None:
        """Fold this epoch's statistics into the running ones, re-smooth, and reset the accumulators."""
        count = self.epoch_count
        seen = count > 0
        # unbiased variance, 0 for a bin with a single sample (as the paper's code)
        var = torch.where(count[:, None] > 1, self.epoch_m2 / (count - 1).clamp_min(1)[:, None], 0.0)
        # weight of the old statistics: momentum, or 0 for a bin's first statistics (taken as they are)
        keep = self.cfg.momentum * (self.tracked > 0).to(self.running_mean.dtype)[:, None]
        for running, new in ((self.running_mean, self.epoch_mean), (self.running_var, var)):
            running.copy_(torch.where(seen[:, None], (1 - keep) * new + keep * running, running))
        self.tracked += count
        valid = self.tracked > 0
        self.smoothed_mean.copy_(smooth_bins(self.running_mean, self.kernel, valid))
        self.smoothed_var.copy_(smooth_bins(self.running_var, self.kernel, valid))
        for buffer in (self.epoch_count, self.epoch_mean, self.epoch_m2):
            buffer.zero_()
