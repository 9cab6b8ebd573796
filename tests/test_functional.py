import pytest
import torch

from elta.functional import dist_std, dist_to_score, emd_loss


def test_dist_to_score_and_std_by_hand():
    dist = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    centers = torch.tensor([1.0, 2.0, 3.0])
    assert dist_to_score(dist, centers).tolist() == pytest.approx([2.5, 1.0])
    # var of {2, 3} with equal weight = 0.25
    assert dist_std(dist, centers).tolist() == pytest.approx([0.5, 0.0])


def test_emd_is_per_sample_root_then_mean():
    pred = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    target = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    # sample 1: CDF diff = [1, 1, 0] -> sqrt(2/3); sample 2: 0. Mean of the two.
    expected = (2 / 3) ** 0.5 / 2
    assert emd_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
    # The original's single root over the batch mean would give sqrt(1/3) instead.
    assert emd_loss(pred, target).item() != pytest.approx((1 / 3) ** 0.5, rel=1e-3)


def test_emd_r1_and_gradient_finite_at_zero():
    pred = torch.tensor([[0.2, 0.3, 0.5]], requires_grad=True)
    target = torch.tensor([[0.5, 0.3, 0.2]])
    # CDF diff = [-0.3, -0.3, 0] -> mean |.| = 0.2
    assert emd_loss(pred, target, r=1).item() == pytest.approx(0.2, rel=1e-6)
    same = torch.tensor([[0.2, 0.3, 0.5]], requires_grad=True)
    emd_loss(same, same.detach()).backward()
    assert torch.isfinite(same.grad).all()


def test_emd_shape_mismatch():
    with pytest.raises(ValueError, match="differ"):
        emd_loss(torch.ones(2, 3) / 3, torch.ones(2, 4) / 4)
