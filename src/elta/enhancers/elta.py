"""The ELTA enhancers: tail feature augmentation (TFA) and feature–label similarity alignment (FLSA).

Liu, He, Ming, Xie, Ma. "ELTA: An Enhancer against Long-Tail for Aesthetics-oriented Models", ICML 2024.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elta.enhancers.base import Enhancer, StepState, register_enhancer
from elta.errors import ConfigError
from elta.functional import flsa_loss, mix_rows, tfa_mix

__all__ = ["TFA", "FLSA"]


@register_enhancer
class TFA(Enhancer):
    """Mix tail-anchored pairs in feature space and append the mixed rows to the batch.

    Anchor i ~ softmax(|s̄ − s_i| / τ1) without replacement, partner j ~ softmax(τ2 / (|s_i − s_j| + ε)),
    λ = P(i) / (P(i) + P(j)); f̃ = λ f_i + (1 − λ) f_j, and the same for targets, scores and weights.
    Score distances are measured in AVA-equivalent units, |Δs| · 9 / (hi − lo) on the dataset's range, so
    τ1, τ2 and ε mean the same on every scale. Draws use torch's default generator of the features' device,
    which the trainer seeds every step. In a distributed run each process mixes pairs within its own share
    of the batch.
    """

    name = "tfa"
    order = 10

    @dataclass
    class Settings:
        tau1: float = 0.5
        tau2: float = 2.0
        pairs: int = 1

        def __post_init__(self) -> None:
            if self.tau1 <= 0 or self.tau2 <= 0:
                raise ConfigError(f"tfa: tau1 and tau2 must be > 0; got {self.tau1}, {self.tau2}")
            if self.pairs < 1:
                raise ConfigError(f"tfa: pairs must be ≥ 1; got {self.pairs}")

    def forward(self, state: StepState) -> StepState:
        settings = (self.cfg.tau1, self.cfg.tau2, self.cfg.pairs)
        mixed = tfa_mix(state.features, state.targets, state.scores, *settings, score_range=state.score_range)
        extra = mix_rows(state.weights, mixed.anchors, mixed.partners, mixed.lam.to(state.weights.dtype))
        state.weights = torch.cat([state.weights, extra])
        state.features, state.targets, state.scores = mixed.features, mixed.targets, mixed.scores
        return state


@register_enhancer
class FLSA(Enhancer):
    """Align the batch's feature cosine similarities with its label similarities.

    L = mean_ij (cos(f_i, f_j) − (1 − |s_i − s_j| / R))², R = the batch's score range (``range: batch``) or
    the dataset's (``range: dataset``); the total loss gains ``weight · L``. In a distributed run the pairs
    span the global batch (every process's rows, gathered with their gradients).
    """

    name = "flsa"
    order = 60

    @dataclass
    class Settings:
        weight: float = 1.0
        range: str = "batch"

        def __post_init__(self) -> None:
            if self.weight < 0:
                raise ConfigError(f"flsa: weight must be ≥ 0; got {self.weight}")
            if self.range not in ("batch", "dataset"):
                raise ConfigError(f"flsa: range must be batch or dataset; got {self.range!r}")

    def forward(self, state: StepState) -> StepState:
        lo, hi = state.score_range
        span = (hi - lo) if self.cfg.range == "dataset" else None
        # over the global batch when several processes train (each adds the same value)
        features, scores = state.gather(state.features), state.gather(state.scores)
        state.losses["flsa"] = self.cfg.weight * flsa_loss(features, scores, score_range=span)
        return state
