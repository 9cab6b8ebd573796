"""Balanced MSE, batch-based Monte Carlo (BMC) form: a main loss for a scalar head under label imbalance.

Ren, Zhang, Yu, Liu. "Balanced MSE for Imbalanced Visual Regression", CVPR 2022.

With predictions p_i and targets y_j of the batch (both on the head's [0, 1] training scale) and a noise
scale σ::

    logits_ij = −(p_i − y_j)² / (2σ²),    L = 2σ² · mean_i CE(logits_i, i)

The factor 2σ² restores the MSE scale and is detached, so σ learns from the cross-entropy alone
(imdb-wiki-dir/balanaced_mse.py, ``bmc_loss``). σ is a learnable parameter of the enhancer, trained with its
own learning rate and no weight decay (see :meth:`BMC.param_groups`). L replaces the main loss.

Defaults: σ₀ = 0.1 on the [0, 1] scale, the reference's IMDB-WIKI-DIR run ``--init_noise_sigma 10.`` on ages
spanning about 100 years (imdb-wiki-dir/README.md; the argparse default is 1.0 in imdb-wiki-dir/train.py);
σ's learning rate 1e-2 (``--sigma_lr``, imdb-wiki-dir/train.py).
Per-sample weights: the cross-entropy is averaged with the step's weights (Σ w_i CE_i / Σ w_i), which is the
reference's plain mean when all weights are 1 (the reference has none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from elta.enhancers.base import Enhancer, StepState, TrainingContext, register_enhancer
from elta.errors import ConfigError

__all__ = ["bmc_loss", "BMC"]


def bmc_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    noise_var: torch.Tensor | float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Balanced MSE (BMC): ``2σ² · CE(−(p_i − y_j)² / (2σ²), diag)``, 2σ² detached.

    pred, target: [N] on one scale; noise_var: σ² (a scalar tensor to learn it); weights: [N] or None
    (plain mean). Differentiable w.r.t. pred and noise_var; returns a float32 scalar (float64 if pred is).
    """
    if pred.dim() != 1 or pred.shape != target.shape:
        raise ValueError(
            f"bmc_loss: pred and target must both be [N]; got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    dtype = torch.promote_types(pred.dtype, torch.float32)
    p, y = pred.to(dtype), target.to(device=pred.device, dtype=dtype)
    var = torch.as_tensor(noise_var, dtype=dtype, device=p.device)
    logits = -(p.unsqueeze(1) - y.unsqueeze(0)).pow(2) / (2 * var)
    ce = F.cross_entropy(logits, torch.arange(p.shape[0], device=p.device), reduction="none")
    if weights is None:
        mean = ce.mean()
    else:
        w = weights.to(device=p.device, dtype=dtype)
        mean = (ce * w).sum() / w.sum().clamp_min(1e-12)
    return mean * (2 * var).detach()


@register_enhancer
class BMC(Enhancer):
    """Replace the main loss by Balanced MSE on the scalar head's [0, 1] output, σ learnt alongside."""

    name = "bmc"
    order = 80
    needs_scalar_head = True

    @dataclass
    class Settings:
        init_noise_sigma: float = 0.1  # σ₀ on the [0, 1] training scale
        sigma_lr: float = 1e-2  # learning rate of σ
        learn_sigma: bool = True  # False: keep σ = σ₀ (the reference's --fix_noise_sigma)

        def __post_init__(self) -> None:
            if self.init_noise_sigma <= 0:
                raise ConfigError(f"bmc: init_noise_sigma must be > 0; got {self.init_noise_sigma}")
            if self.sigma_lr < 0:
                raise ConfigError(f"bmc: sigma_lr must be ≥ 0; got {self.sigma_lr}")

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        sigma = torch.tensor(float(settings.init_noise_sigma))
        self.noise_sigma = nn.Parameter(sigma, requires_grad=settings.learn_sigma)

    def setup(self, context: TrainingContext) -> None:
        if context.num_bins > 0:
            raise ConfigError(
                f"bmc needs a scalar head (--loss mse or l1); this run trains a distribution head with "
                f"{context.num_bins} bins (--loss {context.loss})"
            )

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups for σ (its own learning rate, no weight decay); empty if σ is fixed."""
        if not self.cfg.learn_sigma:
            return []
        return [{"params": [self.noise_sigma], "lr": self.cfg.sigma_lr, "weight_decay": 0.0}]

    def after_head(self, state: StepState, out) -> StepState:
        if out.score_unit is None:
            raise ConfigError("bmc needs a scalar head (--loss mse or l1); the model has a distribution head")
        var = self.noise_sigma.pow(2)
        state.losses["bmc"] = bmc_loss(out.score_unit, state.targets, var, state.weights)
        state.replace_main = True
        return state
