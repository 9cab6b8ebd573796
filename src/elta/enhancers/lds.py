"""Label distribution smoothing (LDS): re-weight samples by the inverse of a smoothed label density.

Yang, Zha, Chen, Wang, Katabi. "Delving into Deep Imbalanced Regression", ICML 2021.

The training MOS are binned on the score scale, the per-bin counts n_b are smoothed by a symmetric kernel k
(ñ = k ∗ n, Eq. 2 of the paper) and each sample of bin b gets the loss weight w ∝ 1 / ñ_b, normalised so
the mean weight over the training set is 1. As in the paper's code, ``sqrt_inv`` (the paper's default
with LDS) smooths √n and ``inverse`` smooths n: w = 1 / (k ∗ n^p)_b with p = 1/2 or 1. The code's clip of
the counts to [5, 1000] for ``inverse`` is tied to its age datasets and is left out.

Defaults from the paper's code: Gaussian kernel, ks = 5 bins, σ = 2 bins, the kernel scaled to a maximum
of 1, the histogram zero-padded at the ends. Bins: ``bin_width`` on the dataset's scale; the default,
a 50th of the score range (0.18 on AVA's 1..10), gives the 50 bins the paper uses on STS-B (0.1 on 0..5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import convolve1d, gaussian_filter1d
from scipy.signal import unit_impulse
from scipy.signal.windows import triang

from elta.enhancers.base import Enhancer, StepState, TrainingContext, register_enhancer
from elta.errors import ConfigError

__all__ = [
    "LDS",
    "KERNELS",
    "DEFAULT_BINS",
    "lds_kernel",
    "bin_edges",
    "bin_index",
    "smoothed_density",
    "lds_weights",
    "check_kernel_settings",
]

KERNELS = ("gaussian", "triangular", "laplace")
DEFAULT_BINS = 50  # bins across the score range when no bin width is given


def lds_kernel(kind: str, ks: int, sigma: float) -> np.ndarray:
    """The smoothing window [ks] over bin offsets −(ks−1)/2 … (ks−1)/2, scaled so its maximum is 1.

    As the paper's code: ``gaussian`` is ``scipy.ndimage.gaussian_filter1d`` of a unit impulse of length
    ks (its 'reflect' border folds the tails back in, so for ks = 5, σ = 2 the window is flatter than
    exp(−x²/2σ²): [0.858, 0.946, 1, 0.946, 0.858]); ``triangular`` is ``scipy.signal.windows.triang(ks)``;
    ``laplace`` is exp(−|x| / σ). ``sigma`` is in bins (unused by ``triangular``).
    """
    check_kernel_settings("lds", kind, ks, sigma)
    half = (ks - 1) // 2
    if kind == "gaussian":
        window = gaussian_filter1d(unit_impulse(ks, "mid"), sigma=sigma)
    elif kind == "triangular":
        window = triang(ks)
    else:
        window = np.exp(-np.abs(np.arange(-half, half + 1)) / sigma)
    return window / window.max()


def check_kernel_settings(owner: str, kind: str, ks: int, sigma: float) -> None:
    """Raise :class:`~elta.errors.ConfigError` naming ``owner`` when the kernel kind, size or width is not usable."""
    if kind not in KERNELS:
        raise ConfigError(f"{owner}: kernel must be one of {', '.join(KERNELS)}; got {kind!r}")
    if ks < 1 or ks % 2 == 0:
        raise ConfigError(f"{owner}: ks must be an odd number of bins ≥ 1 (e.g. 5); got {ks}")
    if sigma <= 0:
        raise ConfigError(f"{owner}: sigma must be > 0 bins (e.g. 2); got {sigma}")


def bin_edges(score_range: tuple[float, float], bin_width: float | None) -> np.ndarray:
    """Bin edges [B+1] on the score scale from the range's low end, ``bin_width`` wide (None: range / 50).

    The last bin may reach past the top of the range when the width does not divide it.
    """
    lo, hi = float(score_range[0]), float(score_range[1])
    if not hi > lo:
        raise ValueError(f"score range ({lo}, {hi}) is empty: its top must be above its bottom")
    width = (hi - lo) / DEFAULT_BINS if bin_width is None else float(bin_width)
    if width <= 0:
        raise ValueError(f"bin_width must be > 0 (on the score scale); got {bin_width}")
    count = max(1, math.ceil((hi - lo) / width - 1e-9))
    return lo + width * np.arange(count + 1)


def bin_index(scores: np.ndarray | torch.Tensor, edges: np.ndarray) -> np.ndarray | torch.Tensor:
    """The bin [N] of each score; scores below or above the edges fall into the first or last bin."""
    inner = edges[1:-1]
    if isinstance(scores, torch.Tensor):
        boundaries = torch.as_tensor(inner, dtype=scores.dtype, device=scores.device)
        return torch.bucketize(scores, boundaries, right=True)
    return np.searchsorted(inner, np.asarray(scores, dtype=np.float64), side="right")


def smoothed_density(
    scores: np.ndarray, edges: np.ndarray, kernel: np.ndarray, power: float = 1.0
) -> np.ndarray:
    """Per-bin smoothed counts [B]: k ∗ n^power, the histogram n of ``scores`` zero-padded at the ends.

    ``power`` 1 is the paper's smoothed label density (Eq. 2, unnormalised); ½ is what its code smooths
    for square-root inverse weights.
    """
    counts = np.bincount(bin_index(scores, edges), minlength=len(edges) - 1).astype(np.float64)
    return convolve1d(counts**power, np.asarray(kernel, dtype=np.float64), mode="constant")


def lds_weights(
    scores: np.ndarray | torch.Tensor,
    score_range: tuple[float, float],
    bin_width: float | None = None,
    kernel: str = "gaussian",
    ks: int = 5,
    sigma: float = 2.0,
    reweight: str = "sqrt_inv",
) -> torch.Tensor:
    """Per-sample loss weights [N] (float32, mean 1): 1 / (k ∗ n^p) of each sample's bin.

    ``reweight``: ``inverse`` (p = 1) or ``sqrt_inv`` (p = ½). ``bin_width`` on the score scale
    (None: a 50th of the range); ``ks`` and ``sigma`` in bins.
    """
    if reweight not in ("inverse", "sqrt_inv"):
        raise ValueError(f"lds: reweight must be inverse or sqrt_inv; got {reweight!r}")
    values = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("lds: no training scores to estimate the label density from")
    edges = bin_edges(score_range, bin_width)
    power = 1.0 if reweight == "inverse" else 0.5
    density = smoothed_density(values, edges, lds_kernel(kernel, ks, sigma), power)
    # every occupied bin has density ≥ its own count^p ≥ 1 (kernel centre 1), so no division by zero
    weights = 1.0 / density[bin_index(values, edges)]
    return torch.as_tensor(weights * (len(weights) / weights.sum()), dtype=torch.float32)


@dataclass
class BinKernelSettings:
    """Label bins and the smoothing kernel, shared by LDS and FDS."""

    bin_width: float | None = None  # on the score scale; None = the score range / 50
    kernel: str = "gaussian"
    ks: int = 5  # kernel size in bins
    sigma: float = 2.0  # kernel width in bins

    def check(self, name: str) -> None:
        if self.bin_width is not None and self.bin_width <= 0:
            raise ConfigError(f"{name}: bin_width must be > 0 (or null for range / 50); got {self.bin_width}")
        check_kernel_settings(name, self.kernel, self.ks, self.sigma)


@register_enhancer
class LDS(Enhancer):
    """Multiply each real row's loss weight by its LDS weight (computed once from the training MOS)."""

    name = "lds"
    order = 5

    @dataclass
    class Settings(BinKernelSettings):
        reweight: str = "sqrt_inv"

        def __post_init__(self) -> None:
            self.check("lds")
            if self.reweight not in ("inverse", "sqrt_inv"):
                raise ConfigError(f"lds: reweight must be inverse or sqrt_inv; got {self.reweight!r}")

    def setup(self, context: TrainingContext) -> None:
        c = self.cfg
        weights = lds_weights(
            context.scores, context.score_range, c.bin_width, c.kernel, c.ks, c.sigma, c.reweight
        )
        self.register_buffer("row_weights", weights)  # [N] one weight per training row

    def forward(self, state: StepState) -> StepState:
        if not hasattr(self, "row_weights"):
            raise RuntimeError("lds: setup(context) must run before the first step (the trainer calls it)")
        if state.indices is None:
            raise ValueError("lds: the step has no training-row indices (StepState.indices)")
        real = len(state.indices)
        own = self.row_weights[state.indices].to(state.weights.dtype)
        state.weights = torch.cat([state.weights[:real] * own, state.weights[real:]])
        return state
