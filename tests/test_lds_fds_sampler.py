"""LDS, FDS (deep imbalanced regression) and tail-aware sampling: hand-computed math, resume, real runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import elta.engine.trainer as train_module
import elta.enhancers.fds  # noqa: F401  (registers fds)
import elta.enhancers.lds  # noqa: F401  (registers lds)
import elta.enhancers.sampler  # noqa: F401  (registers tail-sampler)
from conftest import tiny_config
from elta.enhancers import StepState, TrainingContext, build_enhancers
from elta.enhancers.fds import fds_calibrate, smooth_bins
from elta.enhancers.lds import bin_edges, lds_kernel, lds_weights, smoothed_density
from elta.enhancers.sampler import tail_sample_weights
from elta.models.checkpoint import load_checkpoint

# ---------------------------------------------------------------- helpers


def context(scores, score_range, feature_dim=2, groups=None) -> TrainingContext:
    scores = torch.as_tensor(scores, dtype=torch.float32)
    return TrainingContext(
        scores=scores,
        groups=groups if groups is not None else [""] * len(scores),
        score_range=score_range,
        num_bins=0,
        loss="mse",
        feature_dim=feature_dim,
        epochs=3,
    )


def state(features, scores, epoch, indices=None) -> StepState:
    features = torch.as_tensor(features, dtype=torch.float32)
    n = len(features)
    return StepState(
        features=features,
        targets=torch.zeros(n),
        scores=torch.as_tensor(scores, dtype=torch.float32),
        weights=torch.ones(n),
        score_range=(0.0, 2.0),
        indices=torch.arange(n) if indices is None else indices,
        epoch=epoch,
    )


@pytest.fixture
def drawn(monkeypatch):
    """Record the trainer's epoch draws: (n, sampling weights, batches) of each epoch."""
    calls = []
    real = train_module.epoch_batches

    def spy(n, batch_size, seed, epoch, sample_weights=None):
        batches = real(n, batch_size, seed, epoch, sample_weights)
        calls.append((n, sample_weights, batches))
        return batches

    monkeypatch.setattr(train_module, "epoch_batches", spy)
    return calls


# ---------------------------------------------------------------- LDS


def test_kernels_match_hand_values():
    g = lambda x: math.exp(-(x**2) / 8)  # noqa: E731  σ = 2; scipy truncates at 4σ = 8 bins
    # a unit impulse at position 2 of 5, mirrored at the borders ('reflect'), sits at ..., −8, −3, 2, 7, 12
    centre, next_, edge = g(0) + 2 * g(5), g(1) + g(4) + g(6), g(2) + g(3) + g(7) + g(8)
    expected = np.array([edge, next_, centre, next_, edge]) / centre
    assert np.allclose(lds_kernel("gaussian", 5, 2), expected)
    assert np.allclose(lds_kernel("gaussian", 5, 2), [0.8583, 0.9458, 1, 0.9458, 0.8583], atol=1e-4)
    assert np.allclose(lds_kernel("triangular", 5, 2), [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3])
    e = math.exp
    assert np.allclose(lds_kernel("laplace", 5, 2), [e(-1), e(-0.5), 1, e(-0.5), e(-1)])
    with pytest.raises(ValueError, match="ks must be an odd number"):
        lds_kernel("gaussian", 4, 2)


def test_smoothed_histogram_by_hand():
    edges = bin_edges((1, 5), 1.0)
    assert np.allclose(edges, [1, 2, 3, 4, 5])
    assert len(bin_edges((1, 10), None)) == 51  # default: 50 bins over the range
    scores = np.array([1, 1, 1, 2, 5.0])  # counts [3, 1, 0, 1]: the top of the range joins the last bin
    kernel = lds_kernel("triangular", 3, 1)  # [0.5, 1, 0.5]
    assert np.allclose(smoothed_density(scores, edges, kernel), [3.5, 2.5, 1.0, 1.0])
    r3 = math.sqrt(3)
    assert np.allclose(smoothed_density(scores, edges, kernel, power=0.5), [r3 + 0.5, r3 / 2 + 1, 1.0, 1.0])


def test_lds_weights_mean_one_and_larger_for_rare_scores():
    scores = np.array([1, 1, 1, 2, 5.0])
    inverse = lds_weights(scores, (1, 5), 1.0, "triangular", 3, 1.0, "inverse")
    raw = np.array([1 / 3.5] * 3 + [1 / 2.5, 1.0])
    assert torch.allclose(inverse, torch.tensor(raw * 5 / raw.sum(), dtype=torch.float32))
    sqrt_inv = lds_weights(scores, (1, 5), 1.0, "triangular", 3, 1.0, "sqrt_inv")
    r3 = math.sqrt(3)
    raw = np.array([1 / (r3 + 0.5)] * 3 + [1 / (r3 / 2 + 1), 1.0])
    assert torch.allclose(sqrt_inv, torch.tensor(raw * 5 / raw.sum(), dtype=torch.float32))
    for w in (inverse, sqrt_inv):
        assert w.mean().item() == pytest.approx(1.0)
        assert w[4] > w[3] > w[0]  # the lone 5 > the lone 2 (next to the common 1s) > the 1s
    assert inverse[4] / inverse[0] > sqrt_inv[4] / sqrt_inv[0]  # sqrt_inv is the milder of the two
    default = lds_weights(torch.tensor([1.0, 1.0, 1.0, 2.0, 5.0]), (1, 5), 1.0)  # gaussian 5 / 2, sqrt_inv
    assert default.mean().item() == pytest.approx(1.0) and default[4] > default[0]


def test_lds_multiplies_the_real_rows_weights():
    (lds,) = build_enhancers([{"name": "lds", "bin_width": 1.0, "kernel": "triangular", "ks": 3}])
    lds.setup(context([1, 1, 1, 2, 5], (1.0, 5.0)))
    expected = lds_weights(np.array([1, 1, 1, 2, 5.0]), (1, 5), 1.0, "triangular", 3, 2.0, "sqrt_inv")
    assert torch.allclose(lds.state_dict()["row_weights"], expected)
    s = state(torch.zeros(3, 2), [5.0, 1.0, 3.0], epoch=0, indices=torch.tensor([4, 0]))
    s.weights = torch.tensor([1.0, 2.0, 0.5])  # the third row was appended by an earlier enhancer
    out = lds(s)
    assert torch.allclose(out.weights, torch.stack([expected[4], 2 * expected[0], torch.tensor(0.5)]))


# ---------------------------------------------------------------- FDS


def test_smooth_bins_by_hand():
    values = torch.tensor([[1.0], [4.0], [10.0]])
    kernel = torch.tensor([0.5, 1.0, 0.5])
    # zero padding, kernel renormalised over the bins in reach
    assert torch.allclose(smooth_bins(values, kernel), torch.tensor([[3 / 1.5], [9.5 / 2], [12 / 1.5]]))
    # a bin without statistics neither contributes nor keeps its own value
    valid = torch.tensor([True, False, True])
    assert torch.allclose(smooth_bins(values, kernel, valid), torch.tensor([[1.0], [5.5], [10.0]]))


def test_fds_calibrate_one_row_by_hand():
    mean, var = torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 0.0]])
    smooth_mean, smooth_var = torch.tensor([[5.0, 1.0]]), torch.tensor([[1.0, 9.0]])
    out = fds_calibrate(torch.tensor([[7.0, 6.0]]), torch.tensor([0]), mean, var, smooth_mean, smooth_var)
    ratio = (1 + 1e-5) / (4 + 1e-5)
    # dimension 1 has no spread in its bin and passes unchanged
    assert torch.allclose(out, torch.tensor([[(7 - 3) * math.sqrt(ratio) + 5, 6.0]]))
    clipped = fds_calibrate(
        torch.tensor([[7.0, 6.0]]), torch.tensor([0]), mean, var * 1e4, smooth_mean, smooth_var
    )
    assert clipped[0, 0].item() == pytest.approx(4 * math.sqrt(0.1) + 5)  # the variance ratio stops at 0.1


def build_fds(**settings):
    (fds,) = build_enhancers([{"name": "fds", "bin_width": 1.0, "kernel": "triangular", "ks": 3, **settings}])
    fds.setup(context([0.5, 1.5], (0.0, 2.0)))
    return fds


EPOCH0 = [  # (features, scores) of each step; bin 0 = scores in [0, 1), bin 1 = [1, 2]
    ([[1, 2], [3, 2], [10, 0]], [0.5, 0.5, 1.5]),
    ([[5, 8], [12, 4]], [0.5, 1.5]),
]
EPOCH1 = [([[7, 4]], [0.5]), ([[9, 4]], [0.5])]


def test_fds_running_statistics_and_calibration_by_hand():
    fds = build_fds()
    for features, scores in EPOCH0:
        out = fds(state(features, scores, epoch=0))
        assert torch.equal(out.features, torch.tensor(features, dtype=torch.float32))  # before start_smooth
    fds.on_epoch_end(0)
    # epoch 0, bin 0: rows (1, 2), (3, 2), (5, 8); bin 1: (10, 0), (12, 4); unbiased variances
    assert torch.allclose(fds.running_mean, torch.tensor([[3.0, 4.0], [11.0, 2.0]]))
    assert torch.allclose(fds.running_var, torch.tensor([[4.0, 12.0], [2.0, 8.0]]))
    assert torch.allclose(fds.smoothed_mean, torch.tensor([[8.5, 5.0], [12.5, 4.0]]) / 1.5)
    assert torch.allclose(fds.smoothed_var, torch.tensor([[5.0, 16.0], [4.0, 14.0]]) / 1.5)
    assert torch.equal(fds.epoch_count, torch.zeros(2)) and torch.equal(fds.tracked, torch.tensor([3.0, 2.0]))

    out = fds(state(*EPOCH1[0], epoch=1))  # from the second epoch on, rows are re-calibrated
    ratio = (5 / 1.5 + 1e-5) / (4 + 1e-5), (16 / 1.5 + 1e-5) / (12 + 1e-5)
    expected = [(7 - 3) * math.sqrt(ratio[0]) + 8.5 / 1.5, (4 - 4) * math.sqrt(ratio[1]) + 5 / 1.5]
    assert torch.allclose(out.features, torch.tensor([expected]))
    fds(state(*EPOCH1[1], epoch=1))
    fds.on_epoch_end(1)
    # epoch 1, bin 0: rows (7, 4), (9, 4) -> mean (8, 4), variance (2, 0); bin 1 saw nothing and keeps its stats
    assert torch.allclose(fds.running_mean, torch.tensor([[0.1 * 8 + 0.9 * 3, 4.0], [11.0, 2.0]]))
    assert torch.allclose(fds.running_var, torch.tensor([[0.1 * 2 + 0.9 * 4, 0.9 * 12], [2.0, 8.0]]))


def test_fds_waits_for_start_smooth():
    fds = build_fds(start_smooth=2)
    for features, scores in EPOCH0:
        fds(state(features, scores, epoch=0))
    fds.on_epoch_end(0)
    features, scores = EPOCH1[0]
    assert torch.equal(
        fds(state(features, scores, epoch=1)).features, torch.tensor(features, dtype=torch.float32)
    )
    assert not torch.equal(
        fds(state(features, scores, epoch=2)).features, torch.tensor(features, dtype=torch.float32)
    )


def test_fds_state_survives_a_resume_mid_epoch():
    fds = build_fds()
    for features, scores in EPOCH0:
        fds(state(features, scores, epoch=0))
    fds.on_epoch_end(0)
    fds(state(*EPOCH1[0], epoch=1))  # the checkpoint is written after this step
    saved = {k: v.clone() for k, v in fds.state_dict().items()}
    assert set(saved) == {
        "running_mean",
        "running_var",
        "smoothed_mean",
        "smoothed_var",
        "epoch_mean",
        "epoch_m2",
        "tracked",
        "epoch_count",
    }
    resumed = build_fds()
    resumed.load_state_dict(saved)
    for module in (fds, resumed):
        module.out = module(state(*EPOCH1[1], epoch=1)).features
        module.on_epoch_end(1)
    assert torch.equal(fds.out, resumed.out)
    for key, value in fds.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


# ---------------------------------------------------------------- tail sampler


def test_tail_sample_weights_each_case():
    scores = np.arange(1, 21, dtype=float)  # p20 = 4.8, p80 = 16.2: label tail = 1..4 and 17..20
    groups = ["a"] * 20
    for s, g in [(1, "c"), (10, "c"), (11, ""), (19, "")]:  # c: 2 rows < 0.2 × 11 rows of a; "" never counts
        groups[s - 1] = g
    for s in (5, 6, 7, 8, 9):
        groups[s - 1] = "b"  # 5 rows: not a minority
    w = tail_sample_weights(scores, groups, a=0.5, b=1.5, c=3.0)
    by_score = dict(zip(scores.astype(int).tolist(), w.tolist(), strict=True))
    assert by_score[2] == by_score[18] == by_score[19] == 1.5  # label tail only
    assert by_score[10] == 2.5  # minority group only
    assert by_score[1] == 1 + 0.5 + 1.5 + 3.0  # both: the terms add up
    assert by_score[5] == by_score[11] == by_score[12] == 1.0  # neither
    assert by_score[4] == 1.5 and by_score[17] == 1.5 and by_score[16] == 1.0  # the cuts: ≤ p20, ≥ p80
    defaults = tail_sample_weights(scores, groups)
    assert (defaults[0].item(), defaults[1].item(), defaults[9].item(), defaults[4].item()) == (
        6.0,
        2.0,
        3.0,
        1.0,
    )
    assert torch.equal(
        tail_sample_weights(scores, groups, ratio=0.1), tail_sample_weights(scores, ["a"] * 20)
    )


def test_tail_sampler_defaults_follow_elta2_additive_rule():
    # 10 rows, MOS 1..10: p20 = 2.8, p80 = 8.2, so MOS 1, 2, 9, 10 are the label tail.
    # Group "x" has 8 rows, "y" 1 (< 0.2 × 8 = 1.6: a minority), one row has no group.
    scores = np.arange(1.0, 11.0)
    groups = ["y", "x", "x", "x", "", "x", "x", "x", "x", "x"]
    # w = 1 + 1·label_tail + 2·group_tail + 2·both
    expected = [1 + 1 + 2 + 2, 1 + 1, 1, 1, 1, 1, 1, 1, 1 + 1, 1 + 1]
    assert tail_sample_weights(scores, groups).tolist() == expected
    (sampler,) = build_enhancers([{"name": "tail-sampler"}])
    assert (sampler.cfg.a, sampler.cfg.b, sampler.cfg.c) == (1.0, 2.0, 2.0)
    # a minority-group row off the label tail: 1 + b
    only_group = ["x"] * 4 + ["y"] + ["x"] * 5
    assert tail_sample_weights(scores, only_group).tolist() == [2, 2, 1, 1, 1 + 2, 1, 1, 1, 2, 2]


def test_tail_sampler_changes_no_step_tensors():
    (sampler,) = build_enhancers([{"name": "tail-sampler"}])
    s = state([[1.0, 2.0]], [0.5], epoch=0)
    out = sampler.after_head(sampler(s), None)
    assert out.weights.tolist() == [1.0] and out.features.tolist() == [[1.0, 2.0]] and not out.losses
    assert sampler.sample_weights(context([1.0, 2.0, 3.0], (1.0, 3.0))).tolist() == [2.0, 1.0, 2.0]


# ---------------------------------------------------------------- registry


def test_registry_builds_each_by_name_and_rejects_bad_settings():
    built = build_enhancers(
        [
            {"name": "tfa"},
            {"name": "fds", "momentum": 0.5},
            {"name": "lds", "bin_width": 0.5, "reweight": "inverse"},
            {"name": "tail-sampler", "c": 3.0},
        ]
    )
    assert [e.name for e in built] == ["tail-sampler", "lds", "fds", "tfa"]
    assert built[1].settings()["reweight"] == "inverse" and built[2].cfg.momentum == 0.5
    with pytest.raises(ValueError, match="unknown setting.*sigma2"):
        build_enhancers([{"name": "lds", "sigma2": 1}])
    with pytest.raises(ValueError, match="reweight must be inverse or sqrt_inv"):
        build_enhancers([{"name": "lds", "reweight": "log"}])
    with pytest.raises(ValueError, match="fds: ks must be an odd number"):
        build_enhancers([{"name": "fds", "ks": 4}])
    with pytest.raises(ValueError, match="fds: momentum must be in"):
        build_enhancers([{"name": "fds", "momentum": 1.0}])
    with pytest.raises(ValueError, match="tail-sampler: ratio"):
        build_enhancers([{"name": "tail-sampler", "ratio": 0}])


# ---------------------------------------------------------------- real runs


def test_training_with_lds(demo_data, tmp_path, drawn):
    train_module.train(
        tiny_config(demo_data, epochs=2, enhancers=[{"name": "lds", "bin_width": 0.5}]), tmp_path / "run"
    )
    weights = load_checkpoint(tmp_path / "run" / "last.pt").training["enhancers"]["0.row_weights"]
    assert len(weights) == drawn[-1][0]  # one weight per training row
    assert weights.mean().item() == pytest.approx(1.0) and weights.max() > 1.5 * weights.min()


def test_training_with_fds(demo_data, tmp_path, drawn):
    train_module.train(tiny_config(demo_data, epochs=2, enhancers=[{"name": "fds"}]), tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / "last.pt").training["enhancers"]
    n_train = drawn[-1][0]
    assert saved["0.tracked"].sum().item() == 2 * n_train  # every real row of both epochs entered the stats
    assert saved["0.running_mean"].abs().sum() > 0 and saved["0.smoothed_var"].abs().sum() > 0
    assert saved["0.epoch_count"].sum().item() == 0  # accumulators reset at the epoch's end


def test_training_with_tail_sampler_draws_tail_rows_more_often(demo_data, tmp_path, drawn):
    train_module.train(
        tiny_config(demo_data, epochs=2, enhancers=[{"name": "tail-sampler"}]), tmp_path / "run"
    )
    epochs = [(n, w, batches) for n, w, batches in drawn if w is not None]
    assert len(epochs) == 2
    n, weights, _ = epochs[0]
    tail = weights > 1
    assert 0 < tail.sum() < n
    picks = torch.tensor([i for _, _, batches in epochs for batch in batches for i in batch])
    assert tail[picks].double().mean() > tail.double().mean() + 0.05  # more tail rows than a uniform draw
