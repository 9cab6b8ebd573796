"""TFA and APDS settings mean the same on every score scale: the enhancer and the APDS grid search."""

import numpy as np
import pytest
import torch

from elta.enhancers import build_enhancers
from elta.enhancers.base import StepState
from elta.workflows.pseudo import calibrate_apds

AVA = np.array([1.0, 2.5, 3.0, 4.0, 4.5, 5.0, 5.5, 5.5, 6.0, 6.5, 7.5, 9.5])
SCALES = [(0.0, 1.0), (1.0, 5.0), (0.0, 100.0)]


def _from_ava(scores, lo, hi):
    return lo + (scores - 1) * (hi - lo) / 9


def _state(scores, score_range):
    g = torch.Generator().manual_seed(0)
    dist = torch.rand(len(scores), 4, generator=g, dtype=torch.float64)
    return StepState(
        features=torch.randn(len(scores), 8, generator=g, dtype=torch.float64),
        targets=dist / dist.sum(1, keepdim=True),
        scores=torch.as_tensor(scores, dtype=torch.float64),
        weights=torch.ones(len(scores), dtype=torch.float64),
        score_range=score_range,
    )


@pytest.mark.parametrize(("lo", "hi"), SCALES)
def test_tfa_enhancer_mixes_the_same_pairs_on_any_scale(lo, hi):
    tfa = build_enhancers([{"name": "tfa", "tau1": 0.1, "tau2": 3.0, "pairs": 4}])[0]
    for seed in range(5):
        torch.manual_seed(seed)
        ava = tfa(_state(AVA, (1.0, 10.0)))
        torch.manual_seed(seed)
        ours = tfa(_state(_from_ava(AVA, lo, hi), (lo, hi)))
        # same anchors, partners and λ: the mixed features and targets agree, the mixed scores map across
        assert torch.allclose(ours.features, ava.features, rtol=1e-9, atol=1e-12)
        assert torch.allclose(ours.targets, ava.targets, rtol=1e-9, atol=1e-12)
        assert torch.allclose(ours.scores, _from_ava(ava.scores, lo, hi), rtol=1e-9, atol=1e-12)


def test_tfa_enhancer_on_a_wide_scale_with_tiny_tau1_stays_finite():
    tfa = build_enhancers([{"name": "tfa", "tau1": 0.05, "pairs": 12}])[0]
    torch.manual_seed(0)
    state = tfa(_state(_from_ava(AVA, 0.0, 100.0), (0.0, 100.0)))
    assert state.features.shape == (24, 8)
    assert torch.isfinite(state.features).all() and torch.isfinite(state.weights).all()


@pytest.mark.parametrize(("lo", "hi"), SCALES)
def test_apds_grid_search_chooses_alike_on_any_scale(lo, hi):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(AVA), 10)) * 2
    gt = np.clip(AVA + rng.normal(scale=0.5, size=len(AVA)), 1, 10)
    betas, thresholds = [0.5, 1.0, 1.25], [0.3, 0.5, 0.7, 0.9]
    ava = calibrate_apds(logits, AVA, gt, betas, thresholds, min_selected=2, score_range=(1.0, 10.0))
    ours = calibrate_apds(
        logits,
        _from_ava(AVA, lo, hi),
        _from_ava(gt, lo, hi),
        betas,
        thresholds,
        min_selected=2,
        score_range=(lo, hi),
    )
    assert ours[:2] == ava[:2]
    assert [c["count"] for c in ours[2]] == [c["count"] for c in ava[2]]
    assert len({c["count"] for c in ava[2]}) > 2  # the grid does tell its cells apart
    for mine, theirs in zip(ours[2], ava[2], strict=True):
        if theirs["mae"] is not None:
            assert mine["mae"] == pytest.approx(theirs["mae"] * (hi - lo) / 9)
    # on AVA's own range the grid is the one computed in given units
    assert calibrate_apds(logits, AVA, gt, betas, thresholds, min_selected=2)[2] == ava[2]
