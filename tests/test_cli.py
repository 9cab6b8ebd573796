"""The command line as a user drives it: help, train → evaluate → predict, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import tiny_train_args
from elta.cli import build_parser, main


@pytest.fixture(scope="module")
def trained_run(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    code = main(tiny_train_args(demo_data, run, backbone="test_resnet"))
    assert code == 0
    return run


def test_help_of_every_command():
    out = subprocess.run([sys.executable, "-m", "elta", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("train", "evaluate", "predict", "data", "demo-data", "demo"):
        assert command in out.stdout
    parser = build_parser()
    for argv in (
        ["train", "--help"],
        ["evaluate", "--help"],
        ["predict", "--help"],
        ["data", "check", "--help"],
        ["demo", "--help"],
        ["demo-data", "--help"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 0


def test_evaluate_writes_metrics_predictions_and_report(trained_run, demo_data, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(trained_run / "best.pt"),
                "--data",
                str(demo_data / "AVA.txt"),
                "--split",
                "test",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "SRCC" in printed and "low" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    n_test = len((demo_data / "test.txt").read_text().split())
    assert metrics["n"] == n_test
    for key in (
        "plcc",
        "srcc",
        "krcc",
        "mae",
        "acc",
        "mae_low",
        "mae_medium",
        "mae_high",
        "bmae",
        "emd",
        "bias_low",
        "bias_high",
        "spread",
    ):
        assert key in metrics
    preds = pd.read_csv(out / "predictions.csv")
    assert list(preds.columns[:4]) == ["image_id", "gt", "pred", "pred_std"]
    assert [f"p{k}" for k in range(1, 11)] == [
        c for c in preds.columns if c.startswith("p") and c[1:].isdigit()
    ]
    assert np.allclose(preds[[f"p{k}" for k in range(1, 11)]].sum(axis=1), 1.0, atol=1e-4)
    assert preds["pred"].between(1, 10).all()
    assert Image.open(out / "report.png").size[0] > 300


def test_evaluate_defaults_to_the_checkpoints_dataset(trained_run, tmp_path):
    assert (
        main(["evaluate", "--checkpoint", str(trained_run), "--split", "val", "--out", str(tmp_path / "e")])
        == 0
    )
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["split"] == "val"


def test_predict_scores_a_folder_and_reports_unreadable_files(trained_run, demo_data, tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    for i, name in enumerate(["a.jpg", "nested/b.png"]):
        src = Image.open(demo_data / "images" / f"{i + 1}.jpg")
        src.save(photos / name)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "scores.csv"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(trained_run / "best.pt"),
                str(photos),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    scores = pd.read_csv(out, keep_default_na=False)
    assert len(scores) == 3
    assert list(scores.columns[:3]) == ["path", "score", "std"] and scores.columns[-1] == "error"
    broken = scores[scores["path"].str.endswith("broken.jpg")].iloc[0]
    assert broken["error"] != "" and broken["score"] == ""
    good = scores[scores["error"] == ""]
    assert len(good) == 2 and good["score"].astype(float).between(1, 10).all()
    json_out = tmp_path / "scores.json"
    assert (
        main(["predict", "--checkpoint", str(trained_run), str(photos / "a.jpg"), "--out", str(json_out)])
        == 0
    )
    records = json.loads(json_out.read_text())
    assert len(records) == 1 and len([k for k in records[0] if k.startswith("p")]) == 11  # path + p1..p10


def test_python_api_scores_paths_pil_images_and_tensors(trained_run, demo_data):
    import elta

    scorer = elta.load(trained_run / "best.pt", device="cpu")
    image = Image.open(demo_data / "images" / "1.jpg")
    by_path = scorer.score(demo_data / "images" / "1.jpg")
    by_pil = scorer.score([image])
    by_tensor = scorer.score(scorer.transform(image.convert("RGB"))[None], normalized=True)
    assert by_path["score"].iloc[0] == pytest.approx(by_pil["score"].iloc[0], abs=1e-5)
    assert by_tensor["score"].iloc[0] == pytest.approx(by_pil["score"].iloc[0], abs=1e-5)


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(tmp_path / "missing.pt"), str(tmp_path)]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    assert main(["predict", "--checkpoint", str(bogus), str(tmp_path)]) == 2
    assert "cannot be read as a checkpoint" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nothing.txt"), "--out", str(tmp_path / "r")]) == 2
    assert "nothing.txt" in capsys.readouterr().err


def test_data_check_reports_problems_with_file_and_row(demo_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    lines = (data / "AVA.txt").read_text().splitlines()
    fields = lines[4].split()
    lines[4] = " ".join(fields[:5] + fields[6:])  # one vote count missing on line 5
    (data / "AVA.txt").write_text("\n".join(lines) + "\n")
    (data / "images" / "2.jpg").unlink()
    code = main(["data", "check", "--data", str(data / "AVA.txt"), "--out", str(tmp_path / "problems.csv")])
    printed = capsys.readouterr().out
    assert code == 1
    assert (
        "  AVA.txt:5: 14 fields, expected 15 (index, image id, 10 vote counts" in printed
    )  # file:row: reason
    assert "  AVA.txt:2: image not found: " in printed and "problems (3):" in printed
    problems = pd.read_csv(tmp_path / "problems.csv")
    assert 5 in problems["row"].tolist()
    assert problems["reason"].str.contains("not found").any()
