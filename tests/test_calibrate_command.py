"""elta calibrate: the map is fitted on validation predictions, stored, and applied by evaluate and predict."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import tiny_train_args
from elta.cli import main
from elta.models.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "run"
    assert main(tiny_train_args(demo_data, out, backbone="test_resnet", epochs=2)) == 0
    return out


@pytest.mark.parametrize("method", ["affine", "quantile", "isotonic"])
def test_calibrate_stores_the_map_and_evaluate_reports_before_and_after(
    run, demo_data, tmp_path, method, capsys
):
    calibrated = tmp_path / f"{method}.pt"
    assert (
        main(
            [
                "calibrate",
                "--checkpoint",
                str(run / "best.pt"),
                "--method",
                method,
                "--out",
                str(calibrated),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and "same" in printed  # SRCC unchanged on the fit rows
    spec = load_checkpoint(calibrated).spec
    assert spec.calibration["method"] == method
    assert load_checkpoint(run / "best.pt").spec.calibration is None  # --out left it alone

    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(calibrated), "--split", "test", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["calibration"] == method
    assert metrics["srcc"] == pytest.approx(metrics["before_calibration"]["srcc"], abs=1e-12)
    preds = pd.read_csv(out / "predictions.csv")
    assert "pred_uncalibrated" in preds.columns
    assert not (preds["pred"] == preds["pred_uncalibrated"]).all()

    plain = tmp_path / "plain"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(calibrated),
                "--split",
                "test",
                "--out",
                str(plain),
                "--no-calibration",
            ]
        )
        == 0
    )
    raw = json.loads((plain / "metrics.json").read_text())
    assert "calibration" not in raw and raw["mae"] == pytest.approx(metrics["before_calibration"]["mae"])


def test_predict_applies_the_map_to_the_score_only(run, demo_data, tmp_path):
    calibrated = tmp_path / "affine.pt"
    args = ["calibrate", "--checkpoint", str(run), "--method", "affine", "--out", str(calibrated)]
    assert main([*args, "--device", "cpu"]) == 0
    image = str(demo_data / "images" / "1.jpg")
    assert main(["predict", "--checkpoint", str(calibrated), image, "--out", str(tmp_path / "a.csv")]) == 0
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(calibrated),
                image,
                "--out",
                str(tmp_path / "b.csv"),
                "--no-calibration",
            ]
        )
        == 0
    )
    with_map, without = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert with_map["score_uncalibrated"].iloc[0] == pytest.approx(without["score"].iloc[0], abs=1e-6)
    assert with_map["score"].iloc[0] != pytest.approx(without["score"].iloc[0], abs=1e-6)
    p_cols = [f"p{k}" for k in range(1, 11)]
    pd.testing.assert_frame_equal(with_map[p_cols], without[p_cols])


def test_calibrate_in_place_and_refusing_bad_methods(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "best.pt"
    shutil.copy(run / "best.pt", copy)
    assert main(["calibrate", "--checkpoint", str(copy), "--method", "affine", "--device", "cpu"]) == 0
    assert load_checkpoint(copy).spec.calibration["method"] == "affine"
    with pytest.raises(SystemExit):
        main(["calibrate", "--checkpoint", str(copy), "--method", "spline"])


def test_auto_chooses_by_cross_validation_and_records_the_tails(run, tmp_path, capsys):
    calibrated = tmp_path / "auto.pt"
    assert main(["calibrate", "--checkpoint", str(run), "--out", str(calibrated), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "candidates, by cross-validated mean of low- and high-bucket MAE" in printed
    assert "identity" in printed and "quantile" in printed and "isotonic" in printed
    stored = load_checkpoint(calibrated).spec.calibration
    if stored is None:  # no map served the tails better than none
        assert "now has no calibration map" in printed
    else:
        assert f"→ {stored['chosen']}" in printed
        assert stored["validation"]["after"] <= stored["validation"]["before"]


def test_evaluate_warns_when_the_stored_map_raises_the_tail_mae(run, tmp_path, caplog):
    from elta.calibration import Calibration

    spec = load_checkpoint(run / "best.pt").spec
    squash = Calibration("affine", {"a": 0.2, "b": 4.4}, tuple(spec.score_range), 10).to_dict()
    record = {"chosen": "affine", "objective": "tail", "validation": {"before": 0.5, "after": 0.9}}
    bad = tmp_path / "bad.pt"
    load_checkpoint(run / "best.pt").with_calibration({**squash, **record}).save(bad)
    with caplog.at_level("WARNING", logger="elta"):
        assert (
            main(["evaluate", "--checkpoint", str(bad), "--split", "test", "--out", str(tmp_path / "e")]) == 0
        )
    warned = caplog.text
    assert "raised the tail MAE on the rows it was fitted on (0.5000 → 0.9000)" in warned
    assert (
        "raises the tail MAE on split 'test'" in warned
    )  # pulling every score to the middle hurts the tails


def test_train_with_calibrate_stores_the_validation_map_in_best_pt(demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*tiny_train_args(demo_data, out, backbone="test_resnet"), "--calibrate", "affine"]
    assert main(args) == 0
    stored = load_checkpoint(out / "best.pt").spec.calibration
    validation = len((demo_data / "val.txt").read_text().split())
    assert stored["method"] == "affine" and stored["n_fit"] == validation  # fitted on the validation split
    assert f"calibration: affine stored in {out / 'best.pt'}" in capsys.readouterr().out
