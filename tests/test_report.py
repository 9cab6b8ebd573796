import numpy as np
import pytest
from PIL import Image

from elta.engine.report import draw_report


def test_draw_report_writes_a_png_atomically(tmp_path):
    rng = np.random.default_rng(0)
    gt = rng.uniform(1, 10, 300)
    pred = 0.6 * gt + 2.0 + rng.normal(0, 0.5, 300)
    out = draw_report(pred, gt, tmp_path / "reports" / "test.png", title="AVA test", score_range=(1.0, 10.0))
    assert out == tmp_path / "reports" / "test.png"
    with Image.open(out) as im:
        assert im.format == "PNG"
        width, height = im.size
    assert 800 <= width <= 4000 and 300 <= height <= 2000 and width > height
    assert [p.name for p in out.parent.iterdir()] == ["test.png"]  # no temp file left


def test_draw_report_overwrites_and_handles_degenerate_data(tmp_path):
    path = tmp_path / "r.png"
    path.write_bytes(b"old")
    out = draw_report([5.0, 5.0, 5.0], [5.0, 5.0, 5.0], str(path))
    with Image.open(out) as im:
        im.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png"]


def test_draw_report_rejects_bad_input_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        draw_report([1.0, np.nan], [1.0, 2.0], tmp_path / "r.png")
    assert list(tmp_path.iterdir()) == []


def test_predictions_csv_reproduces_the_reported_metrics_when_predictions_are_close(tmp_path):
    import json

    import pandas as pd

    from elta.engine.evaluate import score_metrics, write_evaluation
    from elta.engine.predictor import Predictions
    from elta.metrics import correlations
    from elta.models.model import ModelSpec

    rng = np.random.default_rng(0)
    n = 60
    gt = rng.uniform(1, 10, n)
    score = 5.5 + 1e-7 * (gt - 5.5) + 1e-8 * rng.normal(size=n)  # differences below 6 significant digits
    frame = pd.DataFrame(
        {"image_id": [f"{i}.jpg" for i in range(n)], "mos": gt, "group": [""] * n, "split": ["test"] * n}
    )
    preds = Predictions(score=score, std=np.full(n, np.nan), dist=None, errors=[""] * n)
    spec = ModelSpec(
        backbone="test_convnext", head="scalar", centers=[1.0, 10.0], score_range=[1.0, 10.0],
        image_size=48, resize=56, mean=[0.5] * 3, std=[0.5] * 3,
    )  # fmt: skip
    metrics = score_metrics(frame, preds, spec)
    write_evaluation(tmp_path, frame, preds, spec, metrics, title="close predictions")
    written = pd.read_csv(tmp_path / "predictions.csv")
    reported = json.loads((tmp_path / "metrics.json").read_text())
    again = correlations(written["pred"].to_numpy(), written["gt"].to_numpy())
    assert again["srcc"] == pytest.approx(reported["srcc"], abs=1e-12)
    assert again["plcc"] == pytest.approx(reported["plcc"], abs=1e-12)
    np.testing.assert_array_equal(written["pred"].to_numpy(), score)  # every bit of every float
