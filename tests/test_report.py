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
