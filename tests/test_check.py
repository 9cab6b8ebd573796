"""Dataset checks on a tiny AVA-layout dataset with real, broken and missing images."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from elta.data.annotations import read_annotations
from elta.data.check import CheckReport, check_dataset, check_images, write_problems

AVA_LINES = [
    "1 101 0 0 0 0 1 0 0 0 0 0 1 0 1",  # MOS 5
    "2 102 0 0 0 0 0 0 1 0 0 0 2 0 1",  # MOS 7, image truncated
    "3 103 0 0 1 0 0 0 0 0 0 0 2 0 1",  # MOS 3, image missing
    "4 104 0 0 0 0 0 0 0 1 0 0 0 0 1",  # MOS 8
    "5 105 0 0 0 0 0 0 0 0 0 0 0 0 1",  # all zero: annotation problem
]


@pytest.fixture
def dataset(tmp_path):
    (tmp_path / "AVA.txt").write_text("\n".join(AVA_LINES) + "\n")
    (tmp_path / "train.txt").write_text("101\n102\n103\n")
    (tmp_path / "test.txt").write_text("104\n")
    images = tmp_path / "images"
    images.mkdir()
    for image_id in ("101", "104"):
        Image.new("RGB", (16, 16), (90, 120, 150)).save(images / f"{image_id}.jpg")
    Image.effect_noise((64, 64), 50).convert("RGB").save(images / "full.jpg", quality=95)
    data = (images / "full.jpg").read_bytes()
    (images / "102.jpg").write_bytes(data[: len(data) // 2])
    return read_annotations(tmp_path / "AVA.txt")


def test_check_images_deep_finds_missing_and_truncated_files(dataset, tmp_path):
    problems = check_images(dataset.frame, deep=True)
    missing = str(tmp_path / "images" / "103.jpg")
    assert [(p["file"], p["row"], p["image_id"]) for p in problems] == [
        ("AVA.txt", 2, "102"),
        ("AVA.txt", 3, "103"),
    ]
    assert problems[0]["reason"].startswith("unreadable image: corrupt or truncated image")
    assert problems[0]["path"] == str(tmp_path / "images" / "102.jpg")
    assert problems[1]["reason"] == f"image not found: {missing}"


def test_check_images_shallow_only_reads_headers(dataset):
    problems = check_images(dataset.frame, deep=False, progress=True)
    assert [p["image_id"] for p in problems] == ["103"]  # the truncated file has an intact header


def test_check_dataset_combines_problems_and_computes_stats(dataset):
    report = check_dataset(dataset)
    assert (report.n_rows, report.n_ok) == (5, 2)
    assert [(p["file"], p["row"]) for p in report.problems] == [
        ("AVA.txt", 5),
        ("AVA.txt", 2),
        ("AVA.txt", 3),
    ]
    assert report.stats["count"] == 2
    assert report.stats["mean"] == pytest.approx(6.5)
    assert report.stats["sd"] == pytest.approx(np.std([5.0, 8.0], ddof=1))
    assert (report.stats["min"], report.stats["max"]) == (5.0, 8.0)
    assert report.stats["splits"] == {"train": 1, "test": 1}


def test_report_format_shows_stats_histogram_and_problems(dataset):
    text = check_dataset(dataset).format(histogram_bins=3, width=10)
    lines = text.splitlines()
    assert lines[0] == "rows: 5 read, 2 ok, 3 problem(s)"
    assert "mean 6.5" in text and "splits: train 1, test 1" in text
    bars = [line for line in lines if "|" in line]
    assert len(bars) == 3
    assert bars[0].endswith("|##########| 1") and bars[1].endswith("|          | 0")
    assert "  AVA.txt:5: all vote counts are zero" in lines


def test_report_format_truncates_long_problem_lists():
    problems = [{"file": "a.csv", "row": i, "reason": "bad"} for i in range(2, 62)]
    stats = {"count": 0, "mean": float("nan"), "sd": float("nan"), "min": float("nan"), "max": float("nan")}
    report = CheckReport(n_rows=60, n_ok=0, problems=problems, stats={**stats, "splits": {}})
    text = report.format()
    assert "a.csv:51: bad" in text and "a.csv:52: bad" not in text
    assert text.endswith("… 10 more")


def test_write_problems_writes_csv_atomically(dataset, tmp_path):
    report = check_dataset(dataset, deep=True)
    out = write_problems(report.problems, tmp_path / "run" / "problems.csv")
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["file", "row", "reason", "image_id", "path"]
    assert [(r["file"], r["row"], r["image_id"]) for r in rows] == [
        ("AVA.txt", "5", ""),
        ("AVA.txt", "2", "102"),
        ("AVA.txt", "3", "103"),
    ]
    write_problems(report.problems[:1], out)
    assert len(out.read_text().splitlines()) == 2  # header + one problem: the file was replaced
    assert sorted(p.name for p in out.parent.iterdir()) == ["problems.csv"]
