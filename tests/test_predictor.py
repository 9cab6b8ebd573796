"""The Predictor as a Python user drives it: the same photo given in every accepted form scores the same,
bad items become error rows, and scores are written in every supported format."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import elta
from conftest import tiny_config
from elta.cli import main
from elta.engine.predictor import write_scores
from elta.engine.trainer import train


@pytest.fixture(scope="module")
def predictor(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("predictor") / "run"
    train(tiny_config(demo_data), run)
    return elta.load(run, device="cpu", workers=0)


@pytest.fixture(scope="module")
def photo(demo_data):
    return demo_data / "images" / "1.jpg"


def test_every_input_form_of_one_photo_scores_the_same(predictor, photo):
    image = Image.open(photo).convert("RGB")
    pixels = np.array(image)
    forms = [
        photo,
        str(photo),
        photo.read_bytes(),
        image,
        pixels,  # [H, W, 3] uint8
        pixels / 255.0,  # floats in [0, 1]
        torch.from_numpy(pixels).permute(2, 0, 1),  # [3, H, W] uint8
        torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0,  # [3, H, W] in [0, 1]
    ]
    frame = predictor.score(forms)
    assert (frame["error"] == "").all(), frame["error"].tolist()
    assert np.allclose(frame["score"], frame["score"].iloc[0], atol=1e-5)
    ready = predictor.transform(image).unsqueeze(0)  # a model input: resized and normalised already
    again = predictor.score(ready, normalized=True)
    assert again["score"].iloc[0] == pytest.approx(frame["score"].iloc[0], abs=1e-5)


def test_bad_items_become_error_rows_and_the_rest_is_scored(predictor, photo, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photo.read_bytes()[:200])
    out_of_range = np.full((32, 32, 3), 2.0)  # floats must be in [0, 1]
    frame = predictor.score([tmp_path / "missing.jpg", broken, b"not an image", out_of_range, photo])
    errors = frame["error"].tolist()
    assert "file not found" in errors[0]
    assert "corrupt or truncated" in errors[1]
    assert "not a recognised image" in errors[2]
    assert "normalized=True" in errors[3]
    assert errors[4] == "" and np.isfinite(frame["score"].iloc[4])
    assert frame["score"].iloc[:4].isna().all()


def test_scale_and_bins_are_exposed(predictor):
    assert predictor.score_range == (1.0, 10.0)
    assert predictor.num_bins == 10


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_scores_round_trip_in_each_format_at_full_precision(predictor, photo, tmp_path, suffix):
    frame = predictor.score([photo, tmp_path / "missing.jpg"])
    out = write_scores(frame, tmp_path / f"scores{suffix}")
    if suffix == ".csv":
        back = pd.read_csv(out, keep_default_na=False, na_values=[""])
    elif suffix == ".json":
        back = pd.DataFrame(json.loads(out.read_text()))
    elif suffix == ".jsonl":
        back = pd.DataFrame([json.loads(line) for line in out.read_text().splitlines()])
    else:
        back = pd.read_parquet(out)
    assert back["score"].iloc[0] == frame["score"].iloc[0]  # exactly: no digits lost
    assert np.isnan(float(back["score"].iloc[1])) and "file not found" in back["error"].iloc[1]


def test_predict_refuses_an_unknown_output_format_before_scoring(photo, tmp_path, capsys):
    run = tmp_path / "model.pt"
    predictor_path = run  # any path: the suffix check comes first
    code = main(
        ["predict", str(photo), "--checkpoint", str(predictor_path), "--out", str(tmp_path / "s.xlsx")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scores are written as .csv, .json, .jsonl, .parquet" in err[0]
    assert not (tmp_path / "s.xlsx").exists()


def test_bytes_of_a_decompression_bomb_are_refused(predictor):
    buffer = io.BytesIO()
    Image.new("L", (12000, 9000)).save(buffer, format="PNG")  # 108 Mpx, over the 100 Mpx limit
    frame = predictor.score([buffer.getvalue()])
    assert "exceeds max_pixels" in frame["error"].iloc[0]
