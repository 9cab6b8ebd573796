import math
import warnings

import numpy as np
import pytest
from scipy import stats

from elta.metrics import balanced_mae, emd, evaluate, format_metrics, minority_groups, tail_buckets

EXPECTED_KEYS = {
    "n",
    "plcc",
    "srcc",
    "krcc",
    "mae",
    "mse",
    "rmse",
    "acc",
    "mae_low",
    "mae_medium",
    "mae_high",
    "bmae",
    "bias_low",
    "bias_high",
    "spread",
}


def test_correlations_match_scipy_and_keys_are_exact():
    rng = np.random.default_rng(0)
    gt = rng.uniform(1, 10, 50)
    pred = gt + rng.normal(0, 1.5, 50)
    m = evaluate(pred, gt, threshold=5.0)
    assert set(m) == EXPECTED_KEYS
    assert m["n"] == 50 and isinstance(m["n"], int)
    assert all(type(v) is float for k, v in m.items() if k != "n")
    assert m["plcc"] == pytest.approx(stats.pearsonr(pred, gt)[0], abs=1e-12)
    assert m["srcc"] == pytest.approx(stats.spearmanr(pred, gt)[0], abs=1e-12)
    assert m["krcc"] == pytest.approx(stats.kendalltau(pred, gt)[0], abs=1e-12)
    assert m["mae"] == pytest.approx(np.mean(np.abs(pred - gt)))
    assert m["mse"] == pytest.approx(np.mean((pred - gt) ** 2))
    assert m["rmse"] == pytest.approx(math.sqrt(m["mse"]))


@pytest.mark.parametrize(
    "pred, gt",
    [([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]), ([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]), ([2.0], [3.0])],
)
def test_correlations_nan_without_warnings_for_constant_or_single_input(pred, gt):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = evaluate(pred, gt, threshold=5.0)
    assert math.isnan(m["plcc"]) and math.isnan(m["srcc"]) and math.isnan(m["krcc"])


def test_mae_rmse_by_hand():
    m = evaluate([1.0, 2.0, 5.0], [2.0, 2.0, 3.0], threshold=5.0)
    assert m["mae"] == pytest.approx(1.0)
    assert m["mse"] == pytest.approx(5.0 / 3.0)
    assert m["rmse"] == pytest.approx(math.sqrt(5.0 / 3.0))


def test_accuracy_threshold_counts_equal_values_as_high():
    pred = [5.0, 4.9, 6.0, 5.0, 3.0]
    gt = [5.0, 5.0, 4.0, 4.99, 2.0]
    # (pred >= 5) == (gt >= 5): T==T, F!=T, T!=F, T!=F, F==F
    assert evaluate(pred, gt, threshold=5.0)["acc"] == pytest.approx(2 / 5)
    # No threshold: the midpoint of (1, 10) is 5.5 -> only sample 2 disagrees.
    assert evaluate(pred, gt, score_range=(1.0, 10.0))["acc"] == pytest.approx(4 / 5)
    # An explicit threshold wins over the score range's midpoint.
    assert evaluate(pred, gt, threshold=5.0, score_range=(1.0, 10.0))["acc"] == pytest.approx(2 / 5)


def test_buckets_include_ties_at_the_cuts():
    # sorted gt: 1 2 2 3 4 5 6 7 7 8 -> p20 = 2 (index 1.8), p80 = 7 (index 7.2); both cuts tied.
    gt = np.array([7.0, 2.0, 5.0, 1.0, 8.0, 3.0, 2.0, 6.0, 4.0, 7.0])
    np.testing.assert_allclose(np.percentile(gt, [20, 80]), [2.0, 7.0])
    buckets = tail_buckets(gt)
    expected = ["high", "low", "medium", "low", "high", "medium", "low", "medium", "medium", "high"]
    assert buckets.tolist() == expected

    err = np.array([-0.2, -0.3, 0.0, 0.5, -0.6, 0.2, 0.1, 0.2, -0.4, -0.1])
    m = evaluate(gt + err, gt, threshold=5.0)
    # low: gt 2, 1, 2 -> errors -0.3, 0.5, 0.1; medium: 5, 3, 6, 4 -> 0, 0.2, 0.2, -0.4; high: 7, 8, 7.
    assert m["mae_low"] == pytest.approx(0.9 / 3)
    assert m["mae_medium"] == pytest.approx(0.8 / 4)
    assert m["mae_high"] == pytest.approx(0.9 / 3)
    assert m["bias_low"] == pytest.approx(0.3 / 3)
    assert m["bias_high"] == pytest.approx(-0.9 / 3)


def test_buckets_interpolated_cuts():
    # gt 1..10: p20 = 2.8, p80 = 8.2 (linear interpolation).
    assert tail_buckets(np.arange(1.0, 11.0)).tolist() == ["low"] * 2 + ["medium"] * 6 + ["high"] * 2


def test_every_sample_in_exactly_one_bucket_with_heavy_ties():
    gt = np.random.default_rng(1).integers(1, 6, 101).astype(float)
    p20, p80 = np.percentile(gt, [20, 80])
    b = tail_buckets(gt)
    assert set(b.tolist()) <= {"low", "medium", "high"}
    np.testing.assert_array_equal(b == "low", gt <= p20)
    np.testing.assert_array_equal(b == "high", gt >= p80)
    np.testing.assert_array_equal(b == "medium", (gt > p20) & (gt < p80))


def test_constant_gt_all_low_and_empty_buckets_are_nan():
    gt = np.full(5, 5.0)
    assert tail_buckets(gt).tolist() == ["low"] * 5
    m = evaluate(gt + 1.0, gt, threshold=5.0)
    assert m["mae_low"] == pytest.approx(1.0)
    assert math.isnan(m["mae_medium"]) and math.isnan(m["mae_high"]) and math.isnan(m["bias_high"])
    assert math.isnan(m["spread"])
    assert m["bmae"] == pytest.approx(1.0)  # range from the data collapses to one bin


def test_regression_to_the_mean_spread_and_bias():
    gt = np.arange(1.0, 10.0)  # p20 = 2.6, p80 = 7.4
    pred = 0.5 * gt + 2.5
    m = evaluate(pred, gt, threshold=5.0)
    assert m["spread"] == pytest.approx(0.5)
    assert m["bias_low"] == pytest.approx((2.0 + 1.5) / 2)  # gt 1, 2
    assert m["bias_high"] == pytest.approx((-1.5 - 2.0) / 2)  # gt 8, 9
    assert m["plcc"] == pytest.approx(1.0)


def test_balanced_mae_by_hand():
    # Range (0, 9) in 3 bins: [0, 3), [3, 6), [6, 9]; values outside clip into the end bins.
    gt = np.array([0.0, 2.9, 3.0, 6.0, 9.0, 10.0, -1.0])
    err = np.array([1.0, -2.0, 0.5, 1.0, -1.0, 4.0, 3.0])
    # bin 0: 0, 2.9, -1 -> 1, 2, 3 (MAE 2); bin 1: 3 -> 0.5; bin 2: 6, 9, 10 -> 1, 1, 4 (MAE 2)
    assert balanced_mae(gt + err, gt, (0.0, 9.0), num_bins=3) == pytest.approx((2.0 + 0.5 + 2.0) / 3)
    # Empty bins are skipped: only bins 0 and 2 hold samples.
    assert balanced_mae([1.0, 8.0, 9.0], [0.0, 7.0, 8.0], (0.0, 9.0), num_bins=3) == pytest.approx(1.0)
    assert balanced_mae([0.0, 9.0, 10.0], [1.0, 7.0, 8.0], (0.0, 9.0), num_bins=3) == pytest.approx(1.5)


def test_balanced_mae_default_bins_are_half_wide_on_ava():
    gt = np.array([1.0, 1.4, 1.5, 10.0, 9.6])
    err = np.array([1.0, 3.0, 2.0, 4.0, 2.0])
    # 18 bins on 1..10: 1.0, 1.4 -> bin 0 (MAE 2); 1.5 -> bin 1 (2); 9.6, 10.0 -> bin 17 (3)
    assert balanced_mae(gt - err, gt, (1.0, 10.0)) == pytest.approx((2.0 + 2.0 + 3.0) / 3)
    m = evaluate(gt - err, gt, threshold=5.0, score_range=(1.0, 10.0))
    assert m["bmae"] == pytest.approx(7.0 / 3)
    # The same 18 bins on another scale (KonIQ 1..5) are 4/18 ~ 0.222 wide: 1.3 starts the second bin.
    assert balanced_mae([1.0, 1.1, 0.9], [1.0, 1.1, 1.2], (1.0, 5.0)) == pytest.approx(0.3 / 3)
    assert balanced_mae([1.0, 1.1, 1.0], [1.0, 1.1, 1.3], (1.0, 5.0)) == pytest.approx((0.0 + 0.3) / 2)


def test_balanced_mae_without_range_uses_gt_min_max():
    # Range (0, 9) from the data, 3 bins: 0 and 2 -> bin 0, 9 -> bin 2.
    assert balanced_mae([1.0, 2.0, 7.0], [0.0, 2.0, 9.0], None, num_bins=3) == pytest.approx((0.5 + 2.0) / 2)


def test_emd_by_hand():
    p = np.array([[0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
    q = np.array([[0.1, 0.3, 0.6], [0.3, 0.3, 0.4]])
    # sample 0: CDFs 0.2 0.7 1.0 vs 0.1 0.4 1.0 -> |diff| 0.1 0.3 0; sample 1: 0.
    assert emd(p, q) == pytest.approx(math.sqrt((0.01 + 0.09) / 3) / 2)
    assert emd(p, q, r=1.0) == pytest.approx((0.4 / 3) / 2)
    assert emd(p, q * 10) == pytest.approx(emd(p, q))  # vote counts are normalised
    m = evaluate([2.1, 2.1], [2.5, 2.1], pred_dist=p, gt_dist=q, threshold=2.0)
    assert set(m) == EXPECTED_KEYS | {"emd"}
    assert m["emd"] == pytest.approx(math.sqrt(0.1 / 3) / 2)
    assert "emd" not in evaluate([2.1, 2.1], [2.5, 2.1], pred_dist=p, threshold=2.0)


def test_minority_groups():
    counts = {"a": 100, "b": 19, "c": 20, "e": 5, "": 1000}
    assert minority_groups(counts) == {"b", "e"}  # "" is no group and not the largest
    assert minority_groups(counts, ratio=0.1) == {"e"}
    assert minority_groups({}) == set()


def test_group_tail_mae():
    counts = {"a": 100, "b": 19, "c": 20, "e": 5}
    groups = ["a", "a", "b", "c", "", "d", "b", "e"]
    gt = np.full(8, 5.0)
    err = np.array([0.1, 0.3, 1.0, 0.2, 9.0, 9.0, -2.0, 0.5])
    m = evaluate(gt + err, gt, threshold=5.0, groups=groups, group_counts=counts)
    assert set(m) == EXPECTED_KEYS | {"mae_minority", "mae_majority", "n_minority", "n_majority"}
    # minority: b, b, e; majority: a, a, c; "" and unknown "d" are neither.
    assert (m["n_minority"], m["n_majority"]) == (3, 3)
    assert m["mae_minority"] == pytest.approx((1.0 + 2.0 + 0.5) / 3)
    assert m["mae_majority"] == pytest.approx((0.1 + 0.3 + 0.2) / 3)
    # Integer tags match string keys; None means no group.
    m = evaluate(
        [1.0, 2.0, 3.0], [0.0, 0.0, 0.0], threshold=5.0, groups=[15, 7, None], group_counts={"15": 50, "7": 1}
    )
    assert (m["n_minority"], m["n_majority"], m["mae_minority"], m["mae_majority"]) == (1, 1, 2.0, 1.0)


def test_group_without_evaluated_samples_is_nan():
    m = evaluate([1.0], [1.5], threshold=5.0, groups=["a"], group_counts={"a": 10, "b": 1})
    assert m["n_minority"] == 0 and math.isnan(m["mae_minority"]) and m["mae_majority"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pred=[1.0, 2.0], gt=[1.0, 2.0, 3.0]), "pred has 2 values but gt has 3"),
        (dict(pred=[[1.0, 2.0]], gt=[[1.0, 2.0]]), "1-D"),
        (dict(pred=[1.0, 2.0, 3.0, np.nan, np.inf], gt=[1.0] * 5), r"pred: 2 non-finite .*index 3"),
        (dict(pred=[1.0, 2.0], gt=[1.0, -np.inf]), r"gt: 1 non-finite .*index 1"),
        (dict(pred=[], gt=[]), "no samples"),
    ],
)
def test_input_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate(**kwargs, threshold=5.0)


def test_other_errors():
    with pytest.raises(ValueError, match="threshold or a score_range"):
        evaluate([1.0], [2.0])
    with pytest.raises(ValueError, match="group_counts"):
        evaluate([1.0], [2.0], threshold=5.0, groups=["a"])
    with pytest.raises(ValueError, match="groups has 1 values"):
        evaluate([1.0, 2.0], [2.0, 3.0], threshold=5.0, groups=["a"], group_counts={"a": 1})
    with pytest.raises(ValueError, match="same shape"):
        emd([[0.5, 0.5]], [[0.2, 0.3, 0.5]])
    with pytest.raises(ValueError, match="gt_dist: 1 row.*row 1"):
        emd([[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.0, 0.0]])
    with pytest.raises(ValueError, match="pred_dist has 1 rows"):
        evaluate([1.0, 2.0], [1.0, 2.0], threshold=5.0, pred_dist=[[1.0, 0.0]], gt_dist=[[1.0, 0.0]])
    with pytest.raises(ValueError, match="low < high"):
        balanced_mae([1.0], [1.0], (5.0, 5.0))
    with pytest.raises(ValueError, match="gt is empty"):
        tail_buckets([])


def test_format_metrics_table():
    m = {"n": 1000, "plcc": 0.777, "srcc": 0.7641, "krcc": 0.5, "mae": 0.4, "mse": 0.3, "rmse": 0.54772,
         "acc": 0.8, "mae_low": 0.438, "mae_medium": 0.302, "mae_high": 0.426, "bmae": 0.41,
         "bias_low": 0.25, "bias_high": -0.3, "spread": 0.61, "emd": 0.07}  # fmt: skip
    text = format_metrics(m, title="AVA test")
    lines = text.splitlines()
    assert lines[0] == "AVA test"
    assert lines[1].split() == ["metric", "value"]
    labels = [" ".join(line.split()[:-1]) for line in lines[3:] if line != "long tail"]
    assert labels == ["n", "PLCC", "SRCC", "KRCC", "acc", "MAE", "RMSE", "EMD", "bMAE",
                      "MAE low", "MAE medium", "MAE high", "bias low", "bias high", "spread"]  # fmt: skip
    assert lines.index("long tail") == 12
    rows = {" ".join(line.split()[:-1]): line.split()[-1] for line in lines[3:] if line != "long tail"}
    assert rows["n"] == "1000" and rows["PLCC"] == "0.7770" and rows["RMSE"] == "0.5477"
    assert rows["bias low"] == "+0.2500" and rows["bias high"] == "-0.3000"
    table = [line for line in lines[1:] if line != "long tail" and not line.startswith("-")]
    assert len({len(line) for line in table}) == 1  # values right-aligned in one column


def test_format_metrics_from_evaluate_with_groups_and_nan():
    m = evaluate([1.0, 2.0], [1.0, 1.0], threshold=5.0, groups=["a", "b"], group_counts={"a": 10, "b": 1})
    text = format_metrics(m)
    assert text.splitlines()[0].split() == ["metric", "value"]
    assert "EMD" not in text
    rows = {" ".join(line.split()[:-1]): line.split()[-1] for line in text.splitlines()}
    assert rows["PLCC"] == "nan"
    assert rows["MAE minority (n=1)"] == "1.0000" and rows["MAE majority (n=1)"] == "0.0000"
