"""Regression enhancers from the imbalanced-regression literature: RankSim, Balanced MSE (BMC), C-Mixup, ConR.

Each loss is checked against values worked out by hand on 2–4 samples, then each enhancer trains one epoch.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import elta.enhancers.bmc  # noqa: F401  (registers bmc)
import elta.enhancers.cmixup  # noqa: F401  (registers cmixup)
import elta.enhancers.conr  # noqa: F401  (registers conr)
import elta.enhancers.ranksim  # noqa: F401  (registers ranksim)
from conftest import tiny_config
from elta.engine.trainer import train
from elta.enhancers import StepState, TrainingContext, build_enhancers
from elta.enhancers.bmc import bmc_loss
from elta.enhancers.cmixup import cmixup_mix, cmixup_partner_probs
from elta.enhancers.conr import conr_loss, conr_masks
from elta.enhancers.ranksim import BlackboxRank, rank_normalised, ranksim_loss, unique_label_subset
from elta.models.checkpoint import load_checkpoint
from elta.models.model import ModelOutput


def unit_vectors(*degrees: float) -> torch.Tensor:
    """2-d unit features at the given angles: cos(f_i, f_j) = cos(angle_i − angle_j)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def state_of(features, scores, targets=None, score_range=(1.0, 10.0), weights=None) -> StepState:
    scores = torch.as_tensor(scores, dtype=torch.float64)
    lo, hi = score_range
    return StepState(
        features=features,
        targets=(scores - lo) / (hi - lo) if targets is None else targets,
        scores=scores,
        weights=torch.ones(len(scores), dtype=torch.float64) if weights is None else weights,
        score_range=score_range,
        indices=torch.arange(len(scores)),
    )


def context(num_bins: int, loss: str) -> TrainingContext:
    return TrainingContext(
        scores=torch.tensor([2.0, 5.0, 8.0]),
        groups=["", "", ""],
        score_range=(1.0, 10.0),
        num_bins=num_bins,
        loss=loss,
        feature_dim=8,
        epochs=1,
    )


# --- RankSim ------------------------------------------------------------------------------------------------


def test_ranks_are_descending_and_normalised():
    # [0.1, 0.5, 0.3]: 0.5 is first (1/3), 0.3 second (2/3), 0.1 third (3/3)
    assert torch.allclose(rank_normalised(torch.tensor([0.1, 0.5, 0.3])), torch.tensor([1.0, 1 / 3, 2 / 3]))
    # ties go to the earlier entry; each row of a matrix is ranked on its own
    ranks = rank_normalised(torch.tensor([[2.0, 2.0, 1.0], [0.0, 1.0, 2.0]]))
    assert torch.allclose(ranks, torch.tensor([[1 / 3, 2 / 3, 1.0], [1.0, 2 / 3, 1 / 3]]))


def test_blackbox_rank_gradient_is_the_interpolation_formula():
    x = torch.tensor([[0.1, 0.5, 0.3]], requires_grad=True)
    ranks = BlackboxRank.apply(x, 2.0)
    ranks.backward(torch.tensor([[1.0, 0.0, 0.0]]))
    # rank(x) = [1, 1/3, 2/3]; x + λg = [2.1, 0.5, 0.3] has ranks [1/3, 2/3, 1];
    # gradient = (rank(x + λg) − rank(x)) / λ = ([1/3, 2/3, 1] − [1, 1/3, 2/3]) / 2 = [−1/3, 1/6, 1/6]
    assert torch.allclose(x.grad, torch.tensor([[-1 / 3, 1 / 6, 1 / 6]]))
    # descending along it moves x[0] up, i.e. to the rank the incoming gradient asks for
    assert x.grad[0, 0] < 0


def test_unique_label_subset_keeps_one_random_sample_per_mos():
    scores = torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0])
    chosen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        keep = unique_label_subset(scores)
        assert sorted(scores[keep].tolist()) == [1.0, 2.0, 3.0]
        assert keep.tolist() == sorted(keep.tolist())
        chosen.add(tuple(keep.tolist()))
    assert len(chosen) > 1  # which of the equal-MOS samples is kept is random
    assert unique_label_subset(torch.tensor([5.0, 4.0, 6.0])).tolist() == [0, 1, 2]


def test_ranksim_loss_is_zero_when_feature_ranks_match_label_ranks():
    # scores [1, 2, 4]: label similarity rows −|Δ| rank as [1/3, 2/3, 1], [2/3, 1/3, 1], [1, 2/3, 1/3].
    # features at 0°, 30°, 90°: cosine rows [1, .87, 0], [.87, 1, .5], [0, .5, 1] rank the same way.
    scores = torch.tensor([1.0, 2.0, 4.0])
    assert ranksim_loss(unit_vectors(0, 30, 90), scores).item() == 0.0


def test_ranksim_loss_by_hand_when_ranks_disagree():
    # Swap the last two features (0°, 90°, 30°): cosine rows [1, 0, .87], [0, 1, .5], [.87, .5, 1] rank as
    # [1/3, 1, 2/3], [1, 1/3, 2/3], [2/3, 1, 1/3]. Row differences to the label ranks: (0, 1/3, −1/3),
    # (1/3, 0, −1/3), (−1/3, 1/3, 0): each row's mean square is 2/27, and L = 3 · 2/27 = 2/9.
    features = unit_vectors(0, 90, 30).requires_grad_()
    loss = ranksim_loss(features, torch.tensor([1.0, 2.0, 4.0]))
    assert loss.item() == pytest.approx(2 / 9)
    loss.backward()
    assert features.grad.abs().sum() > 0


def test_descending_the_blackbox_gradient_aligns_the_rankings():
    torch.manual_seed(0)
    features = torch.randn(12, 6, requires_grad=True)
    scores = torch.rand(12)
    optimizer = torch.optim.SGD([features], lr=1.0)
    first = ranksim_loss(features, scores).item()
    for _ in range(100):
        optimizer.zero_grad()
        ranksim_loss(features, scores).backward()
        optimizer.step()
    assert ranksim_loss(features, scores).item() < 0.25 * first


def test_ranksim_enhancer_uses_one_sample_per_mos_and_weights_by_gamma():
    (ranksim,) = build_enhancers([{"name": "ranksim"}])
    # The two samples of MOS 1 share a feature, so the subset's loss does not depend on which is kept.
    torch.manual_seed(0)
    state = ranksim(state_of(unit_vectors(0, 0, 90, 30), [1.0, 1.0, 2.0, 4.0]))
    assert state.losses["ranksim"].item() == pytest.approx(100 * 2 / 9)  # γ = 100
    state = ranksim(state_of(unit_vectors(0, 0, 30, 90), [1.0, 1.0, 2.0, 4.0]))
    assert state.losses["ranksim"].item() == pytest.approx(0.0)


# --- Balanced MSE (BMC) -------------------------------------------------------------------------------------


def test_bmc_loss_by_hand_for_two_samples():
    # p = [0.2, 0.6], y = [0.3, 0.4], σ² = 0.5 so 2σ² = 1 and logits_ij = −(p_i − y_j)²:
    # row 0: [−0.01, −0.04] -> CE_0 = log(1 + e^(−0.04 + 0.01)) = log(1 + e^−0.03)
    # row 1: [−0.09, −0.04] -> CE_1 = log(1 + e^(−0.09 + 0.04)) = log(1 + e^−0.05)
    pred, target = torch.tensor([0.2, 0.6]), torch.tensor([0.3, 0.4])
    ce0, ce1 = math.log(1 + math.exp(-0.03)), math.log(1 + math.exp(-0.05))
    assert bmc_loss(pred, target, 0.5).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-5)
    # σ² = 0.125 (2σ² = 0.25): logits are 4× larger, and the loss is scaled back by 0.25
    ce0, ce1 = math.log(1 + math.exp(-0.12)), math.log(1 + math.exp(-0.20))
    assert bmc_loss(pred, target, 0.125).item() == pytest.approx(0.25 * (ce0 + ce1) / 2, rel=1e-5)
    weighted = bmc_loss(pred, target, 0.125, weights=torch.tensor([3.0, 1.0]))
    assert weighted.item() == pytest.approx(0.25 * (3 * ce0 + ce1) / 4, rel=1e-5)


def test_bmc_learns_sigma_through_the_cross_entropy_only():
    (bmc,) = build_enhancers([{"name": "bmc", "init_noise_sigma": 0.5}])
    bmc.setup(context(0, "mse"))
    unit = torch.tensor([0.2, 0.6, 0.9])
    state = state_of(torch.zeros(3, 4), [2.8, 4.6, 7.3])  # targets (s − 1) / 9 = [0.2, 0.4, 0.7]
    state = bmc.after_head(state, ModelOutput(state.features, 1 + 9 * unit, score_unit=unit))
    assert state.replace_main
    state.losses["bmc"].backward()
    # The factor 2σ² is a constant: d/dσ [2σ² · CE(σ)] = 2σ² · dCE/dσ
    sigma = torch.tensor(0.5, requires_grad=True)
    ce = bmc_loss(unit, state.targets.float(), sigma**2) / (2 * sigma**2).detach()
    (expected,) = torch.autograd.grad(ce, sigma)
    assert bmc.noise_sigma.grad is not None and bmc.noise_sigma.grad.item() != 0
    assert bmc.noise_sigma.grad.item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    assert bmc.param_groups() == [{"params": [bmc.noise_sigma], "lr": 1e-2, "weight_decay": 0.0}]
    (fixed,) = build_enhancers([{"name": "bmc", "learn_sigma": False}])
    assert not fixed.noise_sigma.requires_grad and fixed.param_groups() == []


def test_bmc_refuses_a_distribution_head():
    (bmc,) = build_enhancers([{"name": "bmc"}])
    with pytest.raises(ValueError, match="bmc needs a scalar head.*--loss mse"):
        bmc.setup(context(10, "emd"))
    dist = torch.full((2, 10), 0.1)
    out = ModelOutput(torch.zeros(2, 4), torch.tensor([5.5, 5.5]), logits=dist.log(), distribution=dist)
    with pytest.raises(ValueError, match="scalar head"):
        bmc.after_head(state_of(torch.zeros(2, 4), [3.0, 6.0], targets=dist), out)


# --- C-Mixup ------------------------------------------------------------------------------------------------


def test_cmixup_partner_probabilities_by_hand():
    # scores [1, 2, 4], h = 1: kernel exp(−Δ²/2).
    # Anchor 0: j=1 e^−0.5, j=2 e^−4.5 -> [0, 1, e^−4] / (1 + e^−4);
    # anchor 2: j=0 e^−4.5, j=1 e^−2 -> [e^−2.5, 1, 0] / (1 + e^−2.5)
    probs = cmixup_partner_probs(torch.tensor([1.0, 2.0, 4.0]), 1.0, torch.tensor([0, 2]))
    a, b = math.exp(-4), math.exp(-2.5)
    expected = torch.tensor([[0.0, 1 / (1 + a), a / (1 + a)], [b / (1 + b), 1 / (1 + b), 0.0]])
    assert torch.allclose(probs, expected)
    assert probs[0, 0] == 0 and probs[1, 2] == 0


def test_cmixup_mixes_returned_pairs_and_keeps_distributions():
    torch.manual_seed(0)
    features = torch.randn(4, 8)
    dist = torch.rand(4, 10)
    dist = dist / dist.sum(1, keepdim=True)
    scores = torch.tensor([1.0, 1.1, 5.0, 5.2])
    mixed = cmixup_mix(features, dist, scores, bandwidth=0.05)
    assert mixed.anchors.tolist() == [0, 1, 2, 3]  # every sample anchors one row
    assert mixed.partners.tolist() == [1, 0, 3, 2]  # a narrow kernel picks the nearest MOS
    lam = mixed.lam[0]
    assert 0 < lam < 1 and torch.all(mixed.lam == lam)  # one λ per step
    a, p = mixed.anchors, mixed.partners
    assert torch.allclose(mixed.features, lam * features[a] + (1 - lam) * features[p])
    assert torch.allclose(mixed.scores, lam * scores[a] + (1 - lam) * scores[p])
    assert torch.allclose(mixed.targets.sum(1), torch.ones(4))
    two = cmixup_mix(features, dist, scores, bandwidth=0.05, pairs=2)
    assert len(two.anchors) == 2 and len(set(two.anchors.tolist())) == 2


def test_cmixup_enhancer_appends_or_replaces():
    torch.manual_seed(0)
    features = torch.randn(4, 8, dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    (cmixup,) = build_enhancers([{"name": "cmixup"}])
    state = cmixup(state_of(features, [1.0, 1.1, 5.0, 5.2], weights=weights))
    assert state.features.shape == (8, 8) and state.targets.shape == (8,) and state.weights.shape == (8,)
    assert torch.equal(state.features[:4], features)
    # bandwidth 0.05 of the 1–10 range = 0.45 MOS: partners are the nearest MOS, weights mixed like the rows
    lam = (state.scores[4] - 1.1) / (1.0 - 1.1)
    assert torch.allclose(state.weights[4:], lam * weights + (1 - lam) * weights[[1, 0, 3, 2]])
    (replacing,) = build_enhancers([{"name": "cmixup", "replace": True, "pairs": 2}])
    state = replacing(state_of(features, [1.0, 1.1, 5.0, 5.2], weights=weights))
    assert state.features.shape == (2, 8) and state.indices is None


# --- ConR ---------------------------------------------------------------------------------------------------


def test_conr_masks_by_hand():
    # y = [1, 1.2, 3], ŷ = [2, 2.1, 2.05], w = 0.5: |Δy| 0-1 = 0.2 (positive); 0-2 = 2.0, 1-2 = 1.8 with
    # |Δŷ| 0.05 ≤ w (negatives, both ways); the diagonal is neither
    pos, neg = conr_masks(torch.tensor([1.0, 1.2, 3.0]), torch.tensor([2.0, 2.1, 2.05]), 0.5)
    assert pos.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    assert neg.tolist() == [[False, False, True], [False, False, True], [True, True, False]]


def test_conr_loss_by_hand_for_three_samples():
    # Same pairs as above; features at 0°, 90°, 45°: c01 = 0, c02 = c12 = √½; t = 1, push e = 0.5 per MOS.
    # Anchor 0: D = e^0 + e^(0.5·2.0) e^√½, ℓ_0 = log D − 0; anchor 1: D = 1 + e^(0.5·1.8) e^√½;
    # anchor 2 has no positive and counts 0. L = (ℓ_0 + ℓ_1 + 0) / 3.
    features = unit_vectors(0, 90, 45).requires_grad_()
    y, preds = torch.tensor([1.0, 1.2, 3.0]), torch.tensor([2.0, 2.1, 2.05])
    loss = conr_loss(features, y, preds, window=0.5, temperature=1.0, push=0.5)
    c = math.exp(math.sqrt(0.5))
    expected = (math.log(1 + math.exp(1.0) * c) + math.log(1 + math.exp(0.9) * c)) / 3
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert features.grad.abs().sum() > 0
    # weights ω scale the pushing weight and the anchor's term: ω_0 = 2 doubles S_02 and ℓ_0
    w = torch.tensor([2.0, 1.0, 1.0])
    weighted = conr_loss(features, y, preds, window=0.5, temperature=1.0, push=0.5, weights=w)
    expected = (2 * math.log(1 + 2 * math.exp(1.0) * c) + math.log(1 + math.exp(0.9) * c)) / 3
    assert weighted.item() == pytest.approx(expected)


def test_conr_loss_is_zero_without_negatives():
    # predictions 4 MOS apart: no pair is predicted alike, so nothing is pushed
    features = torch.randn(3, 5, requires_grad=True)
    y = torch.tensor([1.0, 1.2, 3.0])
    loss = conr_loss(features, y, torch.tensor([1.0, 5.0, 9.0]), window=0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(features.grad).all()


def test_conr_enhancer_scales_window_and_push_by_the_score_range():
    # range 0–10: w = 0.05 · 10 = 0.5 MOS and e = 5 / 10 = 0.5 per MOS, the hand-computed case above
    (conr,) = build_enhancers([{"name": "conr", "w": 0.05, "e": 5.0, "t": 1.0, "beta": 2.0}])
    state = state_of(unit_vectors(0, 90, 45), [1.0, 1.2, 3.0], score_range=(0.0, 10.0))
    state = conr.after_head(state, ModelOutput(state.features, torch.tensor([2.0, 2.1, 2.05])))
    c = math.exp(math.sqrt(0.5))
    expected = (math.log(1 + math.exp(1.0) * c) + math.log(1 + math.exp(0.9) * c)) / 3
    assert state.losses["conr"].item() == pytest.approx(2.0 * expected)
    assert not state.replace_main


# --- Registry and training ----------------------------------------------------------------------------------


def test_registry_builds_each_by_name_in_order_and_rejects_bad_settings():
    names = ["bmc", "conr", "ranksim", "cmixup", "flsa", "tfa"]
    built = build_enhancers([{"name": n} for n in names])
    assert [e.name for e in built] == ["tfa", "cmixup", "flsa", "ranksim", "conr", "bmc"]
    assert built[1].settings() == {
        "name": "cmixup",
        "alpha": 2.0,
        "bandwidth": 0.05,
        "pairs": 0,
        "replace": False,
    }
    assert built[3].settings() == {"name": "ranksim", "gamma": 100.0, "interpolation": 2.0}
    assert built[4].settings() == {"name": "conr", "beta": 4.0, "w": 0.01, "t": 0.07, "e": 1.0}
    assert built[5].settings()["init_noise_sigma"] == 0.1
    for name, typo in [("ranksim", "lambda"), ("bmc", "sigma"), ("cmixup", "tau"), ("conr", "window")]:
        with pytest.raises(ValueError, match=f"unknown setting.*{typo}"):
            build_enhancers([{"name": name, typo: 1}])
    for spec, message in [
        ({"name": "ranksim", "interpolation": 0}, "interpolation must be > 0"),
        ({"name": "bmc", "init_noise_sigma": 0}, "init_noise_sigma must be > 0"),
        ({"name": "cmixup", "bandwidth": -1}, "bandwidth must be > 0"),
        ({"name": "conr", "t": 0}, "t must be > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_enhancers([spec])


@pytest.mark.parametrize(
    ("name", "loss", "term"),
    [
        ("ranksim", "auto", "ranksim"),
        ("bmc", "mse", "bmc"),
        ("cmixup", "auto", "main"),
        ("conr", "auto", "conr"),
    ],
)
def test_training_one_epoch_logs_the_enhancer_term(demo_data, tmp_path, monkeypatch, name, loss, term):
    from elta.enhancers.cmixup import CMixup

    steps = []  # (rows in, rows out, appended rows equal to their anchors) of every cmixup step
    forward = CMixup.forward

    def recording(self, state):
        n = state.features.shape[0]
        out = forward(self, state)
        steps.append(
            (
                n,
                out.features.shape[0],
                torch.equal(out.features[n:], state.features[: out.features.shape[0] - n]),
            )
        )
        return out

    monkeypatch.setattr(CMixup, "forward", recording)
    cfg = tiny_config(demo_data, train={"loss": loss}, enhancers=[{"name": name}])
    train(cfg, tmp_path / "run")
    row = pd.read_csv(tmp_path / "run" / "metrics.csv").iloc[0]
    assert math.isfinite(row[f"train_{term}"])
    assert ("train_main" in row) == (name != "bmc")  # BMC replaces the main loss
    terms = [k for k in row.index if k.startswith("train_") and k != "train_loss"]
    assert row["train_loss"] == pytest.approx(sum(row[k] for k in terms), rel=1e-5)
    if name == "cmixup":  # the mixed rows carry no separate term: every step appended one mixed row per row
        assert steps and all(out == 2 * n and not same for n, out, same in steps)
    if name == "bmc":  # σ is optimised (its own parameter group) and saved with the run
        sigma = load_checkpoint(tmp_path / "run" / "last.pt").training["enhancers"]["0.noise_sigma"]
        assert sigma.item() != pytest.approx(0.1, abs=1e-6)
