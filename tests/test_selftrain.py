"""APDS pseudo-labelling and self-training: the (β, t) search, the pseudo-label CSV, and `elta self-train`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import elta
from conftest import tiny_config
from elta.cli import main
from elta.config import DataConfig, RunConfig
from elta.data.demo import make_demo_dataset
from elta.engine.prepare import read_dataset, read_pseudo_labels
from elta.engine.runtime import Runtime
from elta.engine.trainer import train
from elta.functional import apds_sharpen
from elta.workflows.pseudo import (
    APDSUnavailableError,
    CalibrationError,
    calibrate_apds,
    logits_from_distribution,
    pseudo_label,
    read_unlabeled,
)

CPU = Runtime.create("cpu")

TINY = ["--backbone", "test_convnext", "--weights", "none", "--image-size", "48", "--resize", "56"]
FAST = ["--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--device", "cpu", "--workers", "0"]


# ------------------------------------------------------------------------------------ calibrate_apds


def hand_made():
    """Two bins, logits [0, a]: confidence = sigmoid(a · exp(β · |5 − ŝ|)); the mean prediction is 5.

    sample  ŝ   a     |ŝ − gt|   conf β=1   conf β=2
    A       4   0.50  0.25       0.796      0.976
    B       6   0.20  1.00       0.633      0.814
    C       5   2.00  0.50       0.881      0.881
    D       5   0.10  0.125      0.525      0.525
    E       4   0.35  0.25       0.721      0.930
    F       6   0.05  0.00       0.534      0.591
    """
    a = torch.tensor([0.5, 0.2, 2.0, 0.1, 0.35, 0.05], dtype=torch.float64)
    logits = torch.stack([torch.zeros_like(a), a], dim=1)
    pred = np.array([4.0, 6.0, 5.0, 5.0, 4.0, 6.0])
    gt = np.array([4.25, 7.0, 5.5, 5.125, 3.75, 6.0])
    return logits, pred, gt


def test_calibration_picks_the_lowest_mae_cell_computed_by_hand():
    logits, pred, gt = hand_made()
    beta, t, grid = calibrate_apds(logits, pred, gt, (1.0, 2.0), (0.6, 0.8, 0.9), min_selected=1)
    counts = {(c["beta"], c["threshold"]): c["count"] for c in grid}
    assert counts == {
        (1.0, 0.6): 4,  # A B C E
        (1.0, 0.8): 1,  # C
        (1.0, 0.9): 0,
        (2.0, 0.6): 4,
        (2.0, 0.8): 4,
        (2.0, 0.9): 2,  # A E
    }
    assert [c["mae"] for c in grid] == [0.5, 0.5, None, 0.5, 0.5, 0.25]
    assert (beta, t) == (2.0, 0.9)
    # two images are too few: the best qualifying cells all have MAE 0.5; the first in grid order wins
    beta, t, _ = calibrate_apds(logits, pred, gt, (1.0, 2.0), (0.6, 0.8, 0.9), min_selected=3)
    assert (beta, t) == (1.0, 0.6)


def test_calibration_ties_go_to_the_larger_selection():
    logits, pred, gt = hand_made()
    # t = 0.8 selects C alone (MAE 0.5), t = 0.6 selects four images with the same MAE: the four win
    beta, t, _ = calibrate_apds(logits, pred, gt, (1.0,), (0.8, 0.6), min_selected=1)
    assert (beta, t) == (1.0, 0.6)


def test_calibration_without_a_qualifying_cell_lists_the_grid():
    logits, pred, gt = hand_made()
    with pytest.raises(CalibrationError, match="at least 5 of the 6") as err:
        calibrate_apds(logits, pred, gt, (1.0, 2.0), (0.6, 0.9), min_selected=5)
    message = str(err.value)
    assert "4 / 0.5000" in message and "2 / 0.2500" in message and "0 /      -" in message
    assert "--min-selected" in message


def test_unlabeled_csv_names_images_in_a_recognised_column(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"x")
    (tmp_path / "pool.csv").write_text("Image_Name,other\nimgs/a.jpg,1\nimgs/missing.jpg,2\n")
    assert read_unlabeled([tmp_path / "pool.csv"]) == [tmp_path / "imgs/a.jpg", tmp_path / "imgs/missing.jpg"]
    (tmp_path / "bad.csv").write_text("photo\na.jpg\n")
    with pytest.raises(ValueError, match="bad.csv: no image column; name one of path, image_path"):
        read_unlabeled([tmp_path / "bad.csv"])


# --------------------------------------------------------------------------------- with a real teacher


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """24 unlabeled images (another demo dataset's images/ folder)."""
    root = tmp_path_factory.mktemp("pool")
    make_demo_dataset(root, n=24, seed=11, image_size=64)
    return root / "images"


@pytest.fixture(scope="module")
def self_train_run(demo_data, pool, tmp_path_factory):
    """`elta self-train --rounds 1` on the demo data: teacher and one student, one epoch each."""
    out = tmp_path_factory.mktemp("selftrain") / "st"
    argv = ["self-train", "--data", str(demo_data / "AVA.txt"), "--unlabeled", str(pool), "--out", str(out)]
    argv += ["--rounds", "1", "--betas", "1.0,1.25", "--thresholds", "0.1,0.2", "--min-selected", "3"]
    argv += TINY + FAST
    assert main(argv) == 0
    return out, argv


@pytest.fixture(scope="module")
def teacher(self_train_run):
    return self_train_run[0] / "teacher" / "best.pt"


def test_self_train_writes_its_stages_and_the_student_trains_on_pseudo_labels(self_train_run, capsys):
    out, _ = self_train_run
    for path in ("teacher/best.pt", "round1/pseudo.csv", "round1/pseudo.json", "round1/student/best.pt"):
        assert (out / path).is_file(), path
    pseudo = pd.read_csv(out / "round1" / "pseudo.csv")
    assert len(pseudo) > 0
    split = pd.read_csv(out / "round1" / "student" / "split.csv", dtype=str)
    student_train = set(split.loc[split["split"] == "train", "image_id"])
    teacher_split = pd.read_csv(out / "teacher" / "split.csv", dtype=str)
    teacher_train = set(teacher_split.loc[teacher_split["split"] == "train", "image_id"])
    assert set(pseudo["image_id"]) <= student_train
    assert len(student_train) == len(teacher_train) + len(pseudo)
    assert f"added {len(pseudo)} pseudo-labelled rows" in (out / "round1/student/train.log").read_text()
    result = json.loads((out / "self_train.json").read_text())
    assert [s["name"] for s in result["stages"]] == ["teacher", "round1"]
    assert result["stages"][1]["pseudo_rows"] == len(pseudo)
    assert result["stages"][1]["teacher"] == str(out / "teacher" / "best.pt")


def test_rerunning_self_train_trains_nothing_again(self_train_run, capsys):
    out, argv = self_train_run
    files = [
        out / p for p in ("teacher/best.pt", "teacher/last.pt", "round1/pseudo.csv", "round1/student/last.pt")
    ]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    assert main(argv) == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    table = capsys.readouterr().out
    assert "teacher" in table and "round1" in table and "best val srcc" in table
    assert len(pd.read_csv(out / "round1" / "student" / "metrics.csv")) == 1


def test_changed_settings_after_the_student_started_are_refused(self_train_run, capsys):
    out, argv = self_train_run
    pseudo = (out / "round1" / "pseudo.csv").read_bytes()
    changed = [a if a != "0.1,0.2" else "0.1,0.3" for a in argv]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and f"delete {out / 'round1'}" in err
    assert (out / "round1" / "pseudo.csv").read_bytes() == pseudo


def test_self_train_refuses_a_scalar_head_before_training(demo_data, pool, tmp_path, capsys):
    out = tmp_path / "st"
    argv = ["self-train", "--data", str(demo_data / "AVA.txt"), "--unlabeled", str(pool), "--out", str(out)]
    assert main(argv + TINY + FAST + ["--loss", "mse"]) == 2
    err = capsys.readouterr().err
    assert "scalar head" in err and "--loss emd" in err
    assert not out.exists()


def test_given_beta_and_threshold_select_exactly_the_confident_images(teacher, pool, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    # the teacher's own confidences, computed here from its scores
    scores = elta.load(teacher, device="cpu").score(pool)
    dist = scores[[f"p{k}" for k in range(1, 11)]].to_numpy()
    center = scores["score"].mean()
    conf = apds_sharpen(
        logits_from_distribution(dist), torch.tensor(scores["score"].to_numpy()), 1.25, center
    )
    conf = conf.amax(dim=1).numpy()
    ranked = np.sort(conf)
    t = float(ranked[11] + ranked[12]) / 2  # half the pool lies above

    out = tmp_path / "labels" / "pseudo.csv"
    summary = pseudo_label(teacher, [pool, broken], out, CPU, beta=1.25, threshold=t)
    frame = pd.read_csv(out)
    expected = [
        "image_id", "path", "mos", *[f"p{k}" for k in range(1, 11)], "confidence", "weight", "source",
    ]  # fmt: skip
    assert list(frame.columns) == expected
    assert len(frame) == int((conf > t).sum()) == 12
    assert (frame["confidence"] > t).all()
    by_path = dict(zip(scores["path"].map(lambda p: str(pool / p.split("/")[-1])), conf, strict=True))
    assert np.allclose(frame["confidence"], frame["path"].map(by_path), atol=1e-5)
    assert np.allclose(frame[[f"p{k}" for k in range(1, 11)]].sum(axis=1), 1.0, atol=1e-5)
    assert (
        frame["image_id"].is_unique and (frame["source"] == "pseudo").all() and (frame["weight"] == 1).all()
    )
    # the teacher's unsharpened MOS is the label
    assert np.allclose(frame["mos"], frame["path"].map(dict(zip(by_path, scores["score"], strict=True))))

    saved = json.loads((tmp_path / "labels" / "pseudo.json").read_text())
    assert saved == summary
    assert saved["chosen_by"] == "given" and saved["grid"] is None
    assert (saved["beta"], saved["threshold"]) == (1.25, t)
    assert saved["apds_center"]["unlabeled"] == pytest.approx(center)
    assert saved["counts"] == {
        "pool": 25, "labelled_skipped": 0, "calibration": 0, "scored": 24, "unreadable": 1, "selected": 12,
    }  # fmt: skip
    unreadable = pd.read_csv(saved["unreadable_list"])
    assert (
        unreadable["path"].tolist() == [str(broken)] and "not a recognised image" in unreadable["reason"][0]
    )
    rows = read_pseudo_labels(out, num_bins=10, default_weight=1.0)  # what the trainer reads
    assert len(rows) == 12


def test_grid_search_runs_on_the_teachers_validation_split(teacher, pool, demo_data, tmp_path):
    labelled = demo_data / "images" / "1.jpg"
    summary = pseudo_label(
        teacher,
        [pool, labelled],
        tmp_path / "p.csv",
        CPU,
        betas=(1.0, 1.25),
        thresholds=(0.0, 0.999),
        min_selected=5,
    )
    n_val = len((demo_data / "val.txt").read_text().split())
    assert [c["count"] for c in summary["grid"]] == [n_val, 0, n_val, 0]
    assert (summary["beta"], summary["threshold"]) == (1.0, 0.0)  # equal cells: the first
    assert summary["chosen_by"] == f"grid on {demo_data / 'AVA.txt'} split val"
    # the chosen cell's MAE is the teacher's error on the labelled val images
    cfg = RunConfig(data=DataConfig(data=str(demo_data / "AVA.txt")))
    val = read_dataset(cfg).frame.query("split == 'val'")
    scores = elta.load(teacher, device="cpu").score(list(val["path"]))
    assert summary["grid"][0]["mae"] == pytest.approx(np.abs(scores["score"] - val["mos"].to_numpy()).mean())
    assert summary["apds_center"]["calibration"] == pytest.approx(scores["score"].mean())
    counts = summary["counts"]
    assert (counts["labelled_skipped"], counts["scored"], counts["selected"]) == (1, 24, 24)
    assert labelled.name not in set(pd.read_csv(tmp_path / "p.csv")["path"].map(lambda p: p[-6:]))


def test_cli_prints_the_grid_when_no_cell_qualifies(teacher, pool, tmp_path, capsys):
    argv = [
        "pseudo-label",
        "--checkpoint",
        str(teacher),
        "--unlabeled",
        str(pool),
        "--out",
        str(tmp_path / "p.csv"),
    ]
    assert main(argv + ["--thresholds", "0.999", "--min-selected", "5", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no (β, t) selects at least 5" in err and "0 /      -" in err and "--min-selected" in err
    assert not (tmp_path / "p.csv").exists()


def test_scalar_head_teacher_is_refused(demo_data, pool, tmp_path):
    cfg = tiny_config(demo_data, train={"loss": "mse"})
    best = train(cfg, tmp_path / "scalar")["best"]
    with pytest.raises(APDSUnavailableError, match="scalar head .* --loss emd"):
        pseudo_label(best, [pool], tmp_path / "p.csv", CPU, beta=1.0, threshold=0.5)
