import numpy as np
import pytest
import torch
from scipy import stats

from elta.calibration import (
    METHODS,
    Calibration,
    calibration_report,
    choose_calibration,
    fit_calibration,
    format_calibration_report,
    format_selection,
    select_calibration,
    tail_objective,
)

RANGE = (1.0, 10.0)


def _regressed(seed: int, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """AVA-like long-tailed labels and predictions regressed halfway to the mean."""
    rng = np.random.default_rng(seed)
    gt = rng.normal(5.5, 0.8, n)
    pred = 0.5 * gt + 2.75 + rng.normal(0, 0.2, n)
    return pred, gt


def _fit(method: str, pred, gt) -> Calibration:
    train_gt = _regressed(99, 5000)[1] if method == "quantile" else None
    return fit_calibration(pred, gt, method, score_range=RANGE, train_gt=train_gt)


def test_affine_matches_mean_and_sd_by_hand():
    # pred deviations -1.5 -0.5 0.5 1.5 (var 1.25); gt deviations -3 1 -1 3 (var 5): a = 2, b = 5 - 2 * 5.5 = -6.
    # Least squares would give slope cov / var = 2.25 / 1.25 = 1.8 and keep shrinking.
    pred, gt = np.array([4.0, 5.0, 6.0, 7.0]), np.array([2.0, 6.0, 4.0, 8.0])
    cal = fit_calibration(pred, gt, "affine", score_range=(0.0, 10.0))
    assert cal.params == {"a": pytest.approx(2.0), "b": pytest.approx(-6.0)}
    assert cal.n_fit == 4
    np.testing.assert_allclose(cal.apply(pred), [2.0, 4.0, 6.0, 8.0])
    # clipped to score_range at both ends; a torch tensor works too and the shape is kept
    out = cal.apply(torch.tensor([[2.0, 9.0]]))
    assert isinstance(out, np.ndarray) and out.shape == (1, 2)
    np.testing.assert_allclose(out, [[0.0, 10.0]])


def test_quantile_maps_validation_quantiles_onto_training_quantiles():
    rng = np.random.default_rng(1)
    pred = rng.normal(5.5, 0.4, 500)
    gt = rng.normal(5.5, 0.8, 500)
    train_gt = rng.gamma(4.0, 0.4, 3000) + 3.0  # skewed, inside the score range
    cal = fit_calibration(pred, gt, "quantile", score_range=RANGE, train_gt=train_gt)
    assert len(cal.params["x"]) == 101
    for k in (0, 1, 10, 37, 50, 90, 100):
        q_pred = np.quantile(pred, k / 100)
        assert cal.apply(q_pred) == pytest.approx(np.quantile(train_gt, k / 100), abs=1e-5)
    # beyond the fitted range: linear with the chord slope of the whole map
    x, y = np.array(cal.params["x"]), np.array(cal.params["y"])
    slope = (y[-1] - y[0]) / (x[-1] - x[0])
    assert cal.apply(x[-1] + 0.1) == pytest.approx(y[-1] + 0.1 * slope)
    assert cal.apply(x[0] - 0.1) == pytest.approx(y[0] - 0.1 * slope)


def test_quantile_keeps_all_values_when_few_and_breaks_ties_in_the_targets():
    pred = np.array([3.0, 1.0, 2.0, 4.0, 5.0])
    train_gt = np.array([1.0, 1.0, 1.0, 3.0, 5.0, 5.0, 5.0, 5.0, 5.0])  # repeated labels: tied quantiles
    cal = fit_calibration(pred, pred, "quantile", score_range=(1.0, 5.0), train_gt=train_gt)
    assert cal.params["x"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    # quantiles 0, .25, .5, .75, 1 of train_gt are 1, 1, 5, 5, 5; made strictly increasing within [1, 5]
    np.testing.assert_allclose(cal.params["y"], [1.0, 1.0, 5.0, 5.0, 5.0], atol=1e-5)
    assert np.all(np.diff(cal.params["y"]) > 0) and cal.params["y"][0] == 1.0 and cal.params["y"][-1] == 5.0
    assert np.all(np.diff(cal.apply(np.linspace(1.0, 5.0, 1001))) > 0)


def test_isotonic_pools_violators_by_hand():
    # one violation (5 > 3): block {2, 3} of mean 4 centred at pred 2.5 -> knots (1, 2), (2.5, 4), (4, 6)
    pred, gt = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 5.0, 3.0, 6.0])
    cal = fit_calibration(pred, gt, "isotonic", score_range=(0.0, 10.0))
    assert cal.params == {"x": [1.0, 2.5, 4.0], "y": [2.0, 4.0, 6.0]}
    # strictly increasing through the flat step plain isotonic regression would give pred 2 and 3
    np.testing.assert_allclose(cal.apply([2.0, 3.0]), [2.0 + 2.0 / 1.5, 4.0 + 0.5 * 2.0 / 1.5])
    assert cal.apply(5.0) == pytest.approx(6.0 + 4.0 / 3.0)  # chord slope (6 - 2) / (4 - 1) beyond the end
    # a cascading violation (4 > 3, then 3.5 > 2) pools three points: mean 3 centred at pred 3
    cal = fit_calibration(pred, [1.0, 4.0, 3.0, 2.0], "isotonic", score_range=(0.0, 10.0))
    assert cal.params == {"x": [1.0, 3.0], "y": [1.0, 3.0]}


def test_isotonic_averages_tied_predictions_before_pooling():
    pred, gt = np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0, 5.0])
    cal = fit_calibration(pred, gt, "isotonic", score_range=(0.0, 10.0))
    assert cal.params == {"x": [1.0, 2.0, 3.0], "y": [1.0, 3.0, 5.0]}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_strictly_increasing_and_undoes_regression_to_the_mean(method):
    pred, gt = _regressed(0)
    cal = _fit(method, pred, gt)
    grid = np.linspace(pred.min(), pred.max(), 20001)
    assert np.all(np.diff(cal.apply(grid)) > 0)

    report = calibration_report(pred, gt, cal)
    before, after = report["before"], report["after"]
    assert after["srcc"] == before["srcc"] and after["krcc"] == before["krcc"]
    assert before["spread"] < 0.6 and abs(after["spread"] - 1.0) < abs(before["spread"] - 1.0) - 0.25
    assert before["bias_low"] > 0.3 and abs(after["bias_low"]) < 0.5 * before["bias_low"]
    assert before["bias_high"] < -0.3 and abs(after["bias_high"]) < 0.5 * abs(before["bias_high"])
    assert after["mae_low"] < before["mae_low"] and after["mae_high"] < before["mae_high"]

    # on unseen samples from the same model the ranking is kept too
    test_pred, test_gt = _regressed(7)
    assert stats.spearmanr(cal.apply(test_pred), test_gt)[0] == stats.spearmanr(test_pred, test_gt)[0]


def test_affine_and_quantile_reach_full_spread_isotonic_stops_near_the_correlation():
    pred, gt = _regressed(0)
    spread = {m: calibration_report(pred, gt, _fit(m, pred, gt))["after"]["spread"] for m in METHODS}
    assert spread["affine"] == pytest.approx(1.0)
    assert spread["quantile"] == pytest.approx(1.0, abs=0.05)
    r = stats.pearsonr(pred, gt)[0]
    assert spread["isotonic"] == pytest.approx(r, abs=0.05)


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_through_dict_and_weights_only_checkpoint(method, tmp_path):
    pred, gt = _regressed(2, 400)
    cal = _fit(method, pred, gt)
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal
    path = tmp_path / "ckpt.pt"
    torch.save({"calibration": cal.to_dict()}, path)
    loaded = Calibration.from_dict(torch.load(path, weights_only=True)["calibration"])
    assert loaded == cal and loaded.score_range == RANGE
    np.testing.assert_array_equal(loaded.apply(pred), cal.apply(pred))


def test_errors_name_the_problem():
    pred, gt = _regressed(3, 50)
    with pytest.raises(ValueError, match="unknown calibration method 'platt'"):
        fit_calibration(pred, gt, "platt", score_range=RANGE)
    for method in METHODS:
        with pytest.raises(ValueError, match="predictions are constant"):
            fit_calibration(np.full(50, 5.0), gt, method, score_range=RANGE, train_gt=gt)
    with pytest.raises(ValueError, match="needs train_gt"):
        fit_calibration(pred, gt, "quantile", score_range=RANGE)
    with pytest.raises(ValueError, match="single flat block"):
        fit_calibration(pred, -gt, "isotonic", score_range=RANGE)
    with pytest.raises(ValueError, match="score_range"):
        fit_calibration(pred, gt, score_range=(10.0, 1.0))
    with pytest.raises(ValueError, match="slope a > 0"):
        Calibration.from_dict(
            {"method": "affine", "params": {"a": -1.0, "b": 0.0}, "score_range": RANGE, "n_fit": 3}
        )


def test_format_calibration_report_shows_before_after_and_marks_the_tail_rows():
    pred, gt = _regressed(4, 300)
    report = calibration_report(pred, gt, _fit("affine", pred, gt))
    text = format_calibration_report(report, title="AVA val")
    lines = text.splitlines()
    assert lines[0] == "AVA val" and lines[1].split() == ["metric", "before", "after", "change"]
    srcc = next(line for line in lines if "SRCC" in line)
    assert srcc.startswith("* ") and srcc.split()[-1] == "same"
    spread = next(line for line in lines if "spread" in line).split()
    assert spread[0] == "*" and float(spread[3]) == pytest.approx(1.0, abs=1e-4)
    bias_low = next(line for line in lines if "bias low" in line).split()
    assert (
        bias_low[3].startswith("+")
        and float(bias_low[4]) < float(bias_low[3])
        and bias_low[5].startswith("-")
    )
    assert not next(line for line in lines if "PLCC" in line).startswith("*")


# --- calibrate --method auto ---------------------------------------------------------------------------------


def _shrunk_model(r: float, n: int, seed: int):
    """(pred, gt, train_gt): predictions correlated ``r`` with long-tailed labels and pulled to their mean."""
    rng = np.random.default_rng(seed)
    gt = np.clip(5.4 + 0.75 * rng.standard_t(5, size=n), 1, 10)
    train_gt = np.clip(5.4 + 0.75 * rng.standard_t(5, size=4 * n), 1, 10)
    z = (gt - gt.mean()) / gt.std()
    noise = rng.standard_normal(n)
    pred = gt.mean() + 0.35 * gt.std() * (r * z + np.sqrt(1 - r**2) * noise)
    return pred, gt, train_gt


def test_tail_objective_by_hand():
    gt = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    pred = gt + np.array([1.0, 0, 0, 0, 0, 0, 0, 0, 0, -2.0])
    # p20 = 2.8, p80 = 8.2: low = {1, 2}, high = {9, 10}; low MAE (1 + 0) / 2, high MAE (0 + 2) / 2
    assert tail_objective(pred, gt) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="unknown objective"):
        tail_objective(pred, gt, "median")


@pytest.mark.parametrize("r", [0.3, 0.6, 0.95])
@pytest.mark.parametrize("objective", ["tail", "bmae"])
def test_auto_never_raises_the_objective_and_keeps_the_ranking(r, objective):
    for seed in range(4):
        pred, gt, train_gt = _shrunk_model(r, 150, seed)
        sel = select_calibration(pred, gt, score_range=(1, 10), train_gt=train_gt, objective=objective)
        plain = tail_objective(pred, gt, objective, score_range=(1, 10))
        assert sel.before == pytest.approx(plain)
        assert sel.after <= sel.before + 1e-12
        assert set(sel.cross_validated) >= {"identity", "affine λ=1", "quantile", "isotonic"}
        assert sel.chosen == min(sel.cross_validated, key=sel.cross_validated.get) or sel.chosen == "identity"
        if sel.calibration is not None:
            assert stats.spearmanr(sel.calibration.apply(pred), pred)[0] == pytest.approx(1.0)
            assert sel.after == pytest.approx(tail_objective(sel.calibration.apply(pred), gt, objective,
                                                             score_range=(1, 10)))  # fmt: skip


def test_auto_stretches_a_strong_model_and_spares_a_weak_one():
    # strong (r = 0.95): the predictions carry the ranking, a stretch moves both tails towards the truth
    pred, gt, train_gt = _shrunk_model(0.95, 300, 0)
    strong = select_calibration(pred, gt, score_range=(1, 10), train_gt=train_gt)
    assert strong.calibration is not None and strong.after < 0.8 * strong.before
    # noise (r = 0): stretching it only spreads errors; the cross-validation keeps the identity or a mild shrink
    pred, gt, train_gt = _shrunk_model(0.0, 300, 1)
    weak = select_calibration(pred, gt, score_range=(1, 10), train_gt=train_gt)
    assert weak.chosen not in ("quantile", "affine λ=1", "affine λ=1.25")
    assert weak.after <= weak.before


def test_auto_record_and_choose_calibration_for_one_method():
    pred, gt, train_gt = _shrunk_model(0.8, 100, 2)
    sel = choose_calibration(pred, gt, "isotonic", score_range=(1, 10), train_gt=train_gt)
    assert sel.chosen == "isotonic" and sel.cross_validated == {}
    record = sel.record()
    assert record["validation"] == {"before": pytest.approx(sel.before), "after": pytest.approx(sel.after)}
    auto = choose_calibration(pred, gt, score_range=(1, 10), train_gt=train_gt)
    text = format_selection(auto)
    assert f"→ {auto.chosen}" in text and "identity" in text
