"""TFA, FLSA and APDS math, checked against values worked out by hand."""

import math

import pytest
import torch

from elta.functional import (
    TFAMix,
    apds_select,
    apds_sharpen,
    ava_units,
    flsa_loss,
    tfa_anchor_probs,
    tfa_mix,
    tfa_partner_probs,
)

TAU1_GRID = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5]
TAU2_GRID = [2, 3, 4, 5, 6, 7, 10]


# --- TFA anchor / partner probabilities ----------------------------------------------------------------------


def test_anchor_probs_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # mean 3; |3 - s| = [2, 1, 0, 3]; / 0.5 = [4, 2, 0, 6]
    # exp = [54.59815, 7.38906, 1, 403.42879], sum 466.41600
    expected = [0.1170589, 0.0158422, 0.0021440, 0.8649549]
    p = tfa_anchor_probs(scores, tau1=0.5)
    assert p.dtype == torch.float32
    assert p.tolist() == pytest.approx(expected, rel=1e-5)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert p.argmax().item() == 3  # the far sample (6) is the likeliest anchor


def test_anchor_probs_keep_float64_and_upcast_half():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert tfa_anchor_probs(scores.double(), 0.5).dtype == torch.float64
    half = tfa_anchor_probs(scores.half(), 0.5)
    assert half.dtype == torch.float32
    assert half.tolist() == pytest.approx(tfa_anchor_probs(scores, 0.5).tolist(), rel=1e-5)


def test_partner_probs_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # anchor 1 (s = 2), tau2 = 1, eps = 0.01: |2 - s| = [1, -, 1, 4]
    # logits 1/1.01, 1/1.01, 1/4.01 -> exp 2.691501, 2.691501, 1.283225; sum 6.666227
    expected = [0.4037518, 0.0, 0.4037518, 0.1924965]
    p = tfa_partner_probs(scores, anchor=1, tau2=1.0)
    assert p.tolist() == pytest.approx(expected, rel=1e-5)
    assert p[1].item() == 0.0
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    # A negative index means the same anchor, as in Python.
    assert tfa_partner_probs(scores, anchor=-3, tau2=1.0).tolist() == p.tolist()
    with pytest.raises(IndexError, match="out of range"):
        tfa_partner_probs(scores, anchor=4, tau2=1.0)


@pytest.mark.parametrize("tau2", [10.0, 100.0])
def test_partner_probs_tie_is_finite_and_takes_the_mass(tau2):
    scores = torch.tensor([1.0, 2.0, 2.0, 5.0])
    # anchor 1: the tie at index 2 has logit tau2 / 0.01 (1000 or 10000), the others under tau2 / 1
    p = tfa_partner_probs(scores, anchor=1, tau2=tau2)
    assert torch.isfinite(p).all()
    assert p[1].item() == 0.0
    assert p[2].item() == pytest.approx(1.0, abs=1e-6)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_naive_float64_formula_overflows_with_a_tie():
    # The original's formula, exp(tau2 / (|s_a - s_j| + eps)) / sum, in float64.
    def naive(scores, anchor, tau2, eps=0.01):
        w = torch.exp(tau2 / ((scores[anchor] - scores).abs() + eps))
        w[anchor] = 0
        return w / w.sum()

    scores = torch.tensor([1.0, 2.0, 2.0, 5.0], dtype=torch.float64)
    # tau2 = 7: exp(700) ~ 1e304 still fits in float64; tau2 = 10: exp(1000) = inf, and inf / inf = NaN.
    assert torch.isfinite(naive(scores, 1, 7.0)).all()
    assert torch.isnan(naive(scores, 1, 10.0)).any()
    assert torch.isfinite(tfa_partner_probs(scores, 1, 10.0)).all()


def test_equal_scores_give_uniform_probabilities():
    scores = torch.full((5,), 4.2)
    assert tfa_anchor_probs(scores, 0.05).tolist() == pytest.approx([0.2] * 5, rel=1e-6)
    p = tfa_partner_probs(scores, anchor=2, tau2=100.0)
    assert p.tolist() == pytest.approx([0.25, 0.25, 0.0, 0.25, 0.25], rel=1e-6)


def test_one_far_sample():
    scores = torch.tensor([0.0, 0.0, 0.0, 100.0])
    # mean 25; logits [500, 500, 500, 1500] with tau1 = 0.05: the far sample takes everything.
    p = tfa_anchor_probs(scores, 0.05)
    assert torch.isfinite(p).all()
    assert p.tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0], abs=1e-6)
    # Its partners are all 100 away: uniform over the other three.
    assert tfa_partner_probs(scores, 3, 100.0).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0], rel=1e-5)
    # Anchor 0 ties with 1 and 2; the far one gets nothing.
    assert tfa_partner_probs(scores, 0, 100.0).tolist() == pytest.approx([0.0, 0.5, 0.5, 0.0], abs=1e-6)


@pytest.mark.parametrize("tau1", TAU1_GRID)
def test_every_tuning_setting_is_finite_with_ties(tau1):
    scores = torch.tensor([3.0, 3.0, 5.5, 5.5, 7.2, 1.1, 3.0])
    p = tfa_anchor_probs(scores, tau1)
    assert torch.isfinite(p).all()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    for tau2 in TAU2_GRID:
        for anchor in range(len(scores)):
            q = tfa_partner_probs(scores, anchor, float(tau2))
            assert torch.isfinite(q).all(), (tau1, tau2, anchor)
            assert q[anchor].item() == 0.0
            assert q.sum().item() == pytest.approx(1.0, abs=1e-6)


# --- TFA mixing ----------------------------------------------------------------------------------------------


def _batch(b=6, d=4, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, d, generator=g)
    targets = torch.softmax(torch.randn(b, k, generator=g), dim=1)
    scores = torch.tensor([1.0, 2.0, 3.0, 3.0, 6.0, 8.5])[:b]
    return features, targets, scores


def test_tfa_mix_shapes_and_mixed_rows():
    features, targets, scores = _batch()
    out = tfa_mix(
        features, targets, scores, 0.5, 2.0, num_pairs=2, generator=torch.Generator().manual_seed(1)
    )
    assert isinstance(out, TFAMix)
    assert out.features.shape == (8, 4)
    assert out.targets.shape == (8, 5)
    assert out.scores.shape == (8,)
    assert out.anchors.shape == out.partners.shape == out.lam.shape == (2,)
    assert out.anchors.dtype == out.partners.dtype == torch.long
    # The original rows come back first and untouched.
    assert torch.equal(out.features[:6], features)
    assert torch.equal(out.targets[:6], targets)
    assert torch.equal(out.scores[:6], scores)
    # lambda = P(a) / (P(a) + P(p)), both from the anchor distribution.
    p = tfa_anchor_probs(scores, 0.5)
    a, j = out.anchors, out.partners
    assert torch.allclose(out.lam, p[a] / (p[a] + p[j]))
    lam = out.lam.unsqueeze(1)
    assert torch.allclose(out.features[6:], lam * features[a] + (1 - lam) * features[j])
    assert torch.allclose(out.targets[6:], lam * targets[a] + (1 - lam) * targets[j])
    assert torch.allclose(out.scores[6:], out.lam * scores[a] + (1 - out.lam) * scores[j])
    # Mixed distributions are still distributions.
    assert out.targets[6:].sum(dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_tfa_mix_lambda_by_hand():
    # Two samples: P = softmax([1, 1] / 0.5) = [0.5, 0.5]; the only partner is the other one; lambda = 0.5.
    features = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    scores = torch.tensor([1.0, 3.0])
    out = tfa_mix(features, scores, scores, 0.5, 2.0, num_pairs=1, generator=torch.Generator().manual_seed(0))
    assert out.lam.tolist() == [0.5]
    assert out.partners.item() == 1 - out.anchors.item()
    assert out.features[2].tolist() == [1.0, 2.0]
    assert out.targets.tolist() == [1.0, 3.0, 2.0]  # [B] scalar targets are mixed too


def test_tfa_mix_anchors_without_replacement_partners_differ():
    features, targets, scores = _batch()
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        out = tfa_mix(features, targets, scores, 0.1, 10.0, num_pairs=6, generator=g)
        assert sorted(out.anchors.tolist()) == list(range(6))
        assert (out.partners != out.anchors).all()
    # num_pairs is clamped to the batch.
    out = tfa_mix(features, targets, scores, 0.5, 2.0, num_pairs=50, generator=g)
    assert out.features.shape == (12, 4)
    assert sorted(out.anchors.tolist()) == list(range(6))


def test_tfa_mix_scalar_targets():
    features, _, scores = _batch()
    targets = scores / 10
    out = tfa_mix(
        features, targets, scores, 0.5, 2.0, num_pairs=3, generator=torch.Generator().manual_seed(2)
    )
    assert out.targets.shape == (9,)
    a, j, lam = out.anchors, out.partners, out.lam
    assert torch.allclose(out.targets[6:], lam * targets[a] + (1 - lam) * targets[j])


def test_tfa_mix_tiny_or_empty_requests_return_inputs():
    features, targets, scores = _batch(b=1)
    out = tfa_mix(features, targets, scores, 0.5, 2.0)
    assert out.features is features and out.targets is targets and out.scores is scores
    assert out.anchors.numel() == out.partners.numel() == out.lam.numel() == 0
    features, targets, scores = _batch()
    out = tfa_mix(features, targets, scores, 0.5, 2.0, num_pairs=0)
    assert out.features is features and out.anchors.numel() == 0
    with pytest.raises(ValueError, match="num_pairs"):
        tfa_mix(features, targets, scores, 0.5, 2.0, num_pairs=-1)
    with pytest.raises(ValueError, match="batch sizes differ"):
        tfa_mix(features[:5], targets, scores, 0.5, 2.0)


def test_tfa_mix_draws_follow_anchor_and_partner_probabilities():
    # scores [1, 2, 3, 6], tau1 = 2: logits |3 - s| / 2 = [1, 0.5, 0, 1.5]
    # -> P(i) = [0.2760043, 0.1674051, 0.1015363, 0.4550542]; partners from tfa_partner_probs (tau2 = 0.5).
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    features = torch.zeros(4, 1)
    p_anchor = torch.tensor([0.2760043, 0.1674051, 0.1015363, 0.4550542], dtype=torch.float64)
    assert tfa_anchor_probs(scores, 2.0).double().tolist() == pytest.approx(p_anchor.tolist(), rel=1e-6)
    joint = torch.stack([p_anchor[a] * tfa_partner_probs(scores, a, 0.5).double() for a in range(4)])
    n = 4000
    g = torch.Generator().manual_seed(7)
    counts = torch.zeros(4, 4, dtype=torch.float64)
    for _ in range(n):
        out = tfa_mix(features, scores, scores, 2.0, 0.5, num_pairs=1, generator=g)
        counts[out.anchors[0], out.partners[0]] += 1
    assert counts.diagonal().sum() == 0
    cells = ~torch.eye(4, dtype=torch.bool)
    expected = n * joint[cells]
    chi2 = ((counts[cells] - expected) ** 2 / expected).sum().item()
    # 12 cells, 11 degrees of freedom: the 99.9 % quantile is 31.26. Uniform draws would give several hundred.
    assert chi2 < 31.26
    uniform = torch.full((12,), n / 12, dtype=torch.float64)
    assert ((uniform - expected) ** 2 / expected).sum().item() > 300


def test_tfa_mix_seeded_generator_reproduces():
    features, targets, scores = _batch()
    a = tfa_mix(features, targets, scores, 0.5, 2.0, num_pairs=3, generator=torch.Generator().manual_seed(11))
    b = tfa_mix(features, targets, scores, 0.5, 2.0, num_pairs=3, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a.anchors, b.anchors)
    assert torch.equal(a.partners, b.partners)
    assert torch.equal(a.features, b.features)


def test_tfa_mix_gradient_reaches_features():
    features, targets, scores = _batch()
    features.requires_grad_(True)
    out = tfa_mix(
        features, targets, scores, 0.5, 2.0, num_pairs=1, generator=torch.Generator().manual_seed(5)
    )
    out.features[6:].sum().backward()
    # d(sum of the mixed row)/d f = lambda on the anchor's row, 1 - lambda on the partner's, 0 elsewhere.
    expected = torch.zeros(6, 4)
    expected[out.anchors[0]] = out.lam[0]
    expected[out.partners[0]] = 1 - out.lam[0]
    assert torch.allclose(features.grad, expected)


def test_tfa_mix_keeps_feature_dtype():
    features, targets, scores = _batch()
    out = tfa_mix(features.bfloat16(), targets, scores, 0.5, 2.0, num_pairs=2)
    assert out.features.dtype == torch.bfloat16
    assert out.targets.dtype == torch.float32


def test_tfa_mix_lambda_equals_the_probability_ratio():
    # lambda = sigmoid((d_a - d_p) / tau1) is P(a) / (P(a) + P(p)) wherever the probabilities are finite.
    features, targets, scores = _batch()
    g = torch.Generator().manual_seed(4)
    for tau1 in TAU1_GRID:
        p = tfa_anchor_probs(scores.double(), tau1)
        out = tfa_mix(features, targets, scores.double(), tau1, 2.0, num_pairs=6, generator=g)
        a, j = out.anchors, out.partners
        assert out.lam.tolist() == pytest.approx((p[a] / (p[a] + p[j])).tolist(), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize(
    ("scores", "tau1", "pairs"),
    [
        # 0-100 scores read as AVA units, tau1 = 0.05, 3 pairs: most rows' float32 P(i) underflow to 0
        ([10.0, 35.0, 50.0, 55.0, 70.0, 95.0], 0.05, 3),
        # an AVA batch with tau1 = 0.02 and pairs = batch size
        ([5.1, 5.3, 4.9, 5.6, 6.8, 3.2, 5.0, 5.4, 7.9, 2.5, 5.2, 5.5], 0.02, 12),
    ],
)
def test_tfa_mix_many_pairs_with_tiny_tau1_stays_finite(scores, tau1, pairs):
    scores = torch.tensor(scores)
    assert (tfa_anchor_probs(scores, tau1) == 0).sum() > len(scores) - pairs  # the case that gave NaN
    features = torch.randn(len(scores), 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        out = tfa_mix(features, scores, scores, tau1, 2.0, num_pairs=pairs, generator=g)
        assert torch.isfinite(out.lam).all() and ((out.lam >= 0) & (out.lam <= 1)).all()
        assert torch.isfinite(out.features).all() and torch.isfinite(out.targets).all()
        assert len(set(out.anchors.tolist())) == pairs
        assert (out.partners != out.anchors).all()


def test_tfa_mix_anchors_come_from_the_dominant_tail():
    # mean 5.0625: the two tail rows are 4.06 and 4.44 away, the six others 0.0625. With tau1 = 0.02 the
    # tail's probability exceeds the others' by e^190: two pairs always anchor on the tail rows, and with a
    # third pair the extra anchor comes from the middle while the tail rows keep their place.
    scores = torch.tensor([5.0] * 6 + [1.0, 9.5])
    features = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        out = tfa_mix(features, scores, scores, 0.02, 2.0, num_pairs=2, generator=g)
        assert sorted(out.anchors.tolist()) == [6, 7]
        out = tfa_mix(features, scores, scores, 0.02, 2.0, num_pairs=3, generator=g)
        assert sorted(out.anchors.tolist()[:2]) == [6, 7] and out.anchors[2] < 6
        assert torch.isfinite(out.lam).all()
        # a middle anchor mixed with a tail partner weighs ~0, a tail anchor with a middle partner ~1
        for a, j, lam in zip(out.anchors.tolist(), out.partners.tolist(), out.lam.tolist(), strict=True):
            if (a < 6) != (j < 6):
                assert lam == pytest.approx(1.0 if a >= 6 else 0.0, abs=1e-6)


def test_tfa_mix_two_anchors_follow_sampling_without_replacement():
    # P(i) = [0.2760043, 0.1674051, 0.1015363, 0.4550542] (see above); an unordered pair {i, j} is drawn
    # with probability P(i) P(j) / (1 - P(i)) + P(j) P(i) / (1 - P(j)).
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    p = tfa_anchor_probs(scores.double(), 2.0)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    expected_p = torch.tensor([p[i] * p[j] * (1 / (1 - p[i]) + 1 / (1 - p[j])) for i, j in pairs])
    assert expected_p.sum().item() == pytest.approx(1.0)
    n = 3000
    g = torch.Generator().manual_seed(8)
    counts = torch.zeros(len(pairs), dtype=torch.float64)
    for _ in range(n):
        out = tfa_mix(torch.zeros(4, 1), scores, scores, 2.0, 0.5, num_pairs=2, generator=g)
        counts[pairs.index(tuple(sorted(out.anchors.tolist())))] += 1
    expected = n * expected_p
    # 6 cells, 5 degrees of freedom: the 99.9 % quantile is 20.52
    assert ((counts - expected) ** 2 / expected).sum().item() < 20.52


# --- score units: tau1, tau2, eps and beta act on AVA-equivalent distances ----------------------------------

AVA_SCORES = torch.tensor([1.0, 2.5, 4.0, 5.5, 5.5, 6.0, 7.5, 9.5], dtype=torch.float64)
OTHER_SCALES = [(0.0, 1.0), (0.0, 100.0), (1.0, 5.0)]


def _from_ava(scores: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """AVA 1-10 scores mapped linearly onto [lo, hi]."""
    return lo + (scores - 1) * (hi - lo) / 9


def test_ava_units():
    assert ava_units((1, 10)) == 1.0 and ava_units(None) == 1.0
    assert ava_units([0.0, 1.0]) == 9.0 and ava_units((0, 100)) == pytest.approx(0.09)
    with pytest.raises(ValueError, match="hi > lo"):
        ava_units((5.0, 5.0))


def test_ava_scale_gives_the_values_in_given_units():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert torch.equal(tfa_anchor_probs(scores, 0.5, (1, 10)), tfa_anchor_probs(scores, 0.5))
    assert torch.equal(
        tfa_partner_probs(scores, 1, 1.0, score_range=(1, 10)), tfa_partner_probs(scores, 1, 1.0)
    )
    q = apds_sharpen(APDS_LOGITS, APDS_SCORES, BETA, score_range=(1.0, 10.0))
    assert torch.equal(q, apds_sharpen(APDS_LOGITS, APDS_SCORES, BETA))


@pytest.mark.parametrize(("lo", "hi"), OTHER_SCALES)
def test_tfa_probabilities_on_any_scale_equal_those_on_ava(lo, hi):
    scores = _from_ava(AVA_SCORES, lo, hi)
    for tau1 in TAU1_GRID:
        ours = tfa_anchor_probs(scores, tau1, (lo, hi))
        assert torch.allclose(ours, tfa_anchor_probs(AVA_SCORES, tau1), rtol=1e-9, atol=0)
    for tau2 in TAU2_GRID:
        for anchor in range(len(scores)):
            ours = tfa_partner_probs(scores, anchor, float(tau2), score_range=(lo, hi))
            ava = tfa_partner_probs(AVA_SCORES, anchor, float(tau2))
            assert torch.allclose(ours, ava, rtol=1e-9, atol=1e-300)
    # The same seed draws the same pairs with the same lambda.
    features = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = tfa_mix(features, scores, scores, 0.2, 3.0, 4, torch.Generator().manual_seed(5), (lo, hi))
    ava = tfa_mix(features, AVA_SCORES, AVA_SCORES, 0.2, 3.0, 4, torch.Generator().manual_seed(5))
    assert torch.equal(ours.anchors, ava.anchors) and torch.equal(ours.partners, ava.partners)
    assert torch.allclose(ours.lam, ava.lam, rtol=1e-9)
    assert torch.allclose(ours.scores, _from_ava(ava.scores, lo, hi), rtol=1e-9)


@pytest.mark.parametrize(("lo", "hi"), OTHER_SCALES)
def test_raw_units_would_flatten_or_sharpen_the_anchor_draw(lo, hi):
    # Without the unit change, tau1 = 0.5 would be almost uniform on 0-1 and almost deterministic on 0-100.
    scores = _from_ava(AVA_SCORES, lo, hi)
    ratio = lambda p: (p.max() / p.min()).item()  # noqa: E731
    ava = ratio(tfa_anchor_probs(AVA_SCORES, 0.5))
    assert ratio(tfa_anchor_probs(scores, 0.5, (lo, hi))) == pytest.approx(ava, rel=1e-9)
    # in raw units the logits scale by (hi - lo) / 9: max/min P is AVA's ratio to that power
    assert ratio(tfa_anchor_probs(scores, 0.5)) == pytest.approx(ava ** ((hi - lo) / 9), rel=1e-6)


@pytest.mark.parametrize(("lo", "hi"), OTHER_SCALES)
def test_apds_sharpening_on_any_scale_equals_that_on_ava(lo, hi):
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    scores = _from_ava(AVA_SCORES, lo, hi)
    for beta in (1.0, 1.25):
        ava = apds_sharpen(logits, AVA_SCORES, beta)
        assert torch.allclose(apds_sharpen(logits, scores, beta, score_range=(lo, hi)), ava, rtol=1e-9)
        ours = apds_sharpen(logits, scores, beta, center=lo + 3 * (hi - lo) / 9, score_range=(lo, hi))
        assert torch.allclose(ours, apds_sharpen(logits, AVA_SCORES, beta, center=4.0), rtol=1e-9)
        chosen = apds_select(logits, scores, beta, 0.6, score_range=(lo, hi))
        assert torch.equal(chosen, apds_select(logits, AVA_SCORES, beta, 0.6))


# --- FLSA ----------------------------------------------------------------------------------------------------

# cos matrix of these features: f0 = [1, 0], f1 = [0, 2], f2 = [-3, 0]
#   [[1, 0, -1], [0, 1, 0], [-1, 0, 1]]
FLSA_FEATURES = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])


def test_flsa_by_hand_batch_range():
    scores = torch.tensor([1.0, 2.0, 3.0])
    # R = 2: label sim off-diagonal (0,1) 0.5, (0,2) 0, (1,2) 0.5; diagonal 1 matches.
    # squared diffs: 0.25, 1, 0.25, each twice -> 3.0; mean over all 9 pairs = 1/3
    # (a mean over off-diagonal pairs only would give 0.5)
    loss = flsa_loss(FLSA_FEATURES, scores)
    assert loss.item() == pytest.approx(1 / 3, rel=1e-6)


def test_flsa_by_hand_given_range():
    scores = torch.tensor([1.0, 2.0, 3.0])
    # R = 4: label sim (0,1) 0.75, (0,2) 0.5, (1,2) 0.75
    # squared diffs: 0.5625, 2.25, 0.5625, each twice -> 6.75; / 9 = 0.75
    assert flsa_loss(FLSA_FEATURES, scores, score_range=4.0).item() == pytest.approx(0.75, rel=1e-6)
    with pytest.raises(ValueError, match="score_range"):
        flsa_loss(FLSA_FEATURES, scores, score_range=0.0)


def test_flsa_equal_scores_is_finite():
    scores = torch.full((3,), 5.0, requires_grad=True)
    features = FLSA_FEATURES.clone().requires_grad_(True)
    # R = 0 -> label sim 1 everywhere; squared diffs (0,1) 1, (0,2) 4, (1,2) 1, each twice -> 12; / 9 = 4/3
    loss = flsa_loss(features, scores)
    assert loss.item() == pytest.approx(4 / 3, rel=1e-6)
    loss.backward()
    assert torch.isfinite(features.grad).all()
    assert torch.isfinite(scores.grad).all()


def test_flsa_low_precision_features_computed_in_float32():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(8, 16, generator=g)
    scores = torch.rand(8, generator=g) * 9 + 1
    ref = flsa_loss(features, scores)
    low = flsa_loss(features.bfloat16(), scores)
    assert low.dtype == torch.float32
    # Exactly the float32 loss of the rounded features, and close to the full-precision one.
    assert low.item() == flsa_loss(features.bfloat16().float(), scores).item()
    assert low.item() == pytest.approx(ref.item(), rel=1e-2)
    assert flsa_loss(features.half(), scores).dtype == torch.float32


def test_flsa_stays_float32_under_autocast():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(8, 64, generator=g)
    scores = torch.rand(8, generator=g) * 9 + 1
    ref = flsa_loss(features, scores)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = flsa_loss(features, scores)
    assert under.dtype == torch.float32
    assert under.item() == pytest.approx(ref.item(), rel=1e-6)


def test_flsa_gradient_finite():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(5, 3, generator=g, requires_grad=True)
    flsa_loss(features, torch.tensor([1.0, 2.0, 2.0, 4.0, 9.0])).backward()
    assert torch.isfinite(features.grad).all()
    assert features.grad.abs().sum() > 0


# --- APDS ----------------------------------------------------------------------------------------------------

# Every sample has logits [0, ln 3]: softmax = [0.25, 0.75]. Scores [4, 5, 6], default centre = 5.
# beta = ln 2, so the logit scale is exp(beta * d) = 2 ** d for a distance d from the centre:
#   d = 1 -> logits [0, 2 ln 3] -> [1/10, 9/10];  d = 2 -> [0, 4 ln 3] -> [1/82, 81/82].
APDS_LOGITS = torch.tensor([[0.0, math.log(3)]] * 3)
APDS_SCORES = torch.tensor([4.0, 5.0, 6.0])
BETA = math.log(2)


def test_apds_sharpen_by_hand_default_center():
    q = apds_sharpen(APDS_LOGITS, APDS_SCORES, BETA)
    expected = [[0.1, 0.9], [0.25, 0.75], [0.1, 0.9]]
    for row, want in zip(q.tolist(), expected, strict=True):
        assert row == pytest.approx(want, rel=1e-5)
    # The samples away from the centre are sharper than the one at it.
    assert q[0].max() > q[1].max()


def test_apds_sharpen_by_hand_given_center():
    # centre 4: distances [0, 1, 2]
    expected = [[0.25, 0.75], [0.1, 0.9], [1 / 82, 81 / 82]]
    for center in (4.0, torch.tensor(4.0)):
        q = apds_sharpen(APDS_LOGITS, APDS_SCORES, BETA, center=center)
        for row, want in zip(q.tolist(), expected, strict=True):
            assert row == pytest.approx(want, rel=1e-5)


def test_apds_beta_zero_is_plain_softmax():
    logits = torch.tensor([[0.3, -1.2, 2.0], [1.0, 1.0, 0.0]])
    q = apds_sharpen(logits, torch.tensor([1.0, 9.0]), beta=0.0)
    assert torch.allclose(q, torch.softmax(logits, dim=1))


def test_apds_select_threshold():
    # max q: default centre [0.9, 0.75, 0.9]; centre 4 [0.75, 0.9, 0.9878]
    assert apds_select(APDS_LOGITS, APDS_SCORES, BETA, threshold=0.8).tolist() == [True, False, True]
    assert apds_select(APDS_LOGITS, APDS_SCORES, BETA, 0.8, center=4.0).tolist() == [False, True, True]
    assert apds_select(APDS_LOGITS, APDS_SCORES, BETA, 0.95, center=4.0).tolist() == [False, False, True]
    assert apds_select(APDS_LOGITS, APDS_SCORES, BETA, 0.7).dtype == torch.bool
