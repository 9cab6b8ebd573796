"""Scoring a collection as a curator does: streamed into parts, killed and resumed, split into shards and
merged, read from WebDataset tars and Parquet path lists, bad inputs as error rows, and the exact top 5 %."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

import elta
from conftest import tiny_config
from elta.cli import main
from elta.engine.trainer import train
from elta.workflows.collection import read_frames

N_IMAGES = 3000  # a collection large enough that a kill lands mid-way through many parts


@pytest.fixture(scope="module")
def run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("collection") / "run"
    train(tiny_config(demo_data), out)
    return out


@pytest.fixture(scope="module")
def photos(demo_data, tmp_path_factory):
    """N_IMAGES distinct small JPEGs (crops, flips and tints of the demo photos) in two folders."""
    root = tmp_path_factory.mktemp("photos")
    sources = sorted((demo_data / "images").glob("*.jpg"))
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        image = Image.open(sources[i % len(sources)]).convert("RGB")
        w, h = image.size
        left, top = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
        image = image.crop((left, top, left + 3 * w // 4, top + 3 * h // 4)).resize((64, 64))
        if i % 2:
            image = ImageOps.mirror(image)
        tint = Image.new("RGB", image.size, tuple(int(v) for v in rng.integers(0, 255, 3)))
        image = Image.blend(image, tint, float(rng.uniform(0, 0.3)))
        folder = root / ("a" if i < N_IMAGES // 2 else "b")
        folder.mkdir(exist_ok=True)
        image.save(folder / f"{i:04d}.jpg", quality=90)
    return root


def _predict(*args) -> int:
    return main(["predict", *map(str, args), "--device", "cpu", "--workers", "0"])


def _read(path) -> pd.DataFrame:
    return pd.concat(list(read_frames(path)), ignore_index=True)


@pytest.fixture(scope="module")
def reference(run, photos, tmp_path_factory):
    """One uninterrupted streamed run over the photos (batch 32, parts of 64 rows)."""
    out = tmp_path_factory.mktemp("reference") / "scores.parquet"
    assert _predict(photos, "--checkpoint", run, "--out", out, "--batch-size", "32", "--part-rows", "64") == 0
    return _read(out)


def test_streamed_scores_equal_the_predictors_and_every_format_reads_back(run, photos, reference, tmp_path):
    assert len(reference) == N_IMAGES and (reference["error"] == "").all()
    assert reference["path"].is_unique and "index" not in reference
    direct = elta.load(run, device="cpu", workers=0).score(photos).set_index("path")
    np.testing.assert_allclose(
        reference.set_index("path").loc[direct.index, "score"], direct["score"], rtol=0, atol=1e-6
    )
    half = reference[reference["path"].str.contains(f"{os.sep}a{os.sep}")].reset_index(drop=True)
    for suffix in (".csv", ".jsonl", ".json"):
        out = tmp_path / f"scores{suffix}"
        assert (
            _predict(
                photos / "a", "--checkpoint", run, "--out", out, "--batch-size", "32", "--part-rows", "64"
            )
            == 0
        )
        pd.testing.assert_frame_equal(_read(out), half)
    summary = json.loads((tmp_path / "scores.summary.json").read_text())
    assert summary["images"] == summary["scored"] == len(half) and summary["failed"] == 0
    assert sum(summary["histogram"]["counts"]) == len(half)
    assert summary["percentiles"]["p5"] == pytest.approx(np.percentile(half["score"], 5))
    assert (tmp_path / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.parts"))  # the parts are gone once the output is whole


def test_a_killed_run_resumes_to_every_image_once_with_the_same_scores(run, photos, reference, tmp_path):
    out = tmp_path / "scores.parquet"
    parts = tmp_path / "scores.parquet.parts"
    args = [sys.executable, "-m", "elta", "predict", str(photos), "--checkpoint", str(run), "--out", str(out),
            "--device", "cpu", "--workers", "0", "--batch-size", "32", "--part-rows", "64"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("part-*"))) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and parts.is_dir(), "the run finished before it could be killed"
    done = len(list(parts.glob("part-*")))
    assert 3 <= done < N_IMAGES // 64

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    pd.testing.assert_frame_equal(_read(out), reference)  # every image once, in order, the same scores


def test_an_unfinished_run_is_not_overwritten_without_resume(run, photos, tmp_path, capsys):
    out = tmp_path / "s.csv"
    (tmp_path / "s.csv.parts").mkdir()
    assert _predict(photos / "a", "--checkpoint", run, "--out", out) == 2
    assert "--resume" in capsys.readouterr().err


def test_two_shards_merged_equal_one_run(run, photos, reference, tmp_path, capsys):
    out = tmp_path / "scores.parquet"
    for shard in ("0/2", "1/2"):
        assert (
            _predict(photos, "--checkpoint", run, "--out", out, "--batch-size", "32", "--shard", shard) == 0
        )
    shards = [_read(tmp_path / f"scores.shard-{i}-of-2.parquet") for i in range(2)]
    assert 0 < len(shards[0]) < N_IMAGES and len(shards[0]) + len(shards[1]) == N_IMAGES
    assert main(["merge-scores", str(out), "--shards", "2", "--top", "5%"]) == 0
    merged = _read(out)
    pd.testing.assert_frame_equal(merged.drop(columns=["score", "std", "score_uncalibrated"], errors="ignore"),
                                  reference.drop(columns=["score", "std", "score_uncalibrated"], errors="ignore"),
                                  check_exact=False, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(merged["score"], reference["score"], rtol=0, atol=1e-6)
    assert f"selected {round(0.05 * N_IMAGES)} (top 5%" in capsys.readouterr().out
    assert main(["merge-scores", str(tmp_path / "other.parquet"), "--shards", "2"]) == 2
    assert "shard files missing" in capsys.readouterr().err


def test_top_and_bottom_select_exactly_that_share(run, photos, reference, tmp_path):
    out = tmp_path / "scores.csv"
    best = tmp_path / "best"
    assert _predict(photos, "--checkpoint", run, "--out", out, "--top", "5%", "--copy-to", best) == 0
    chosen = pd.read_csv(tmp_path / "scores.selected.csv")
    k = round(0.05 * N_IMAGES)  # no tie at the cut here; k = ⌊0.05·N + ½⌋
    expected = reference.sort_values(["score", "path"], ascending=[False, True]).head(k)
    assert chosen["path"].tolist() == expected["path"].tolist()
    assert chosen["rank"].tolist() == list(range(1, k + 1))
    copies = sorted(best.iterdir())
    rank = f"{1:0{len(str(k))}d}"  # ranks are zero-padded to the width of k, so the folder sorts by rank
    assert len(copies) == k and copies[0].name == f"{rank}-{Path(expected['path'].iloc[0]).name}"
    assert copies[0].read_bytes() == Path(expected["path"].iloc[0]).read_bytes()

    assert _predict(photos, "--checkpoint", run, "--out", out, "--bottom", "2.5%", "--min-score", "0",
                    "--copy-to", tmp_path / "worst", "--link") == 0  # fmt: skip
    chosen = pd.read_csv(tmp_path / "scores.selected.csv")
    assert chosen["path"].tolist() == reference.nsmallest(round(0.025 * N_IMAGES), "score")["path"].tolist()
    assert all(p.is_symlink() for p in (tmp_path / "worst").iterdir())

    cut = float(np.median(reference["score"]))
    assert _predict(photos, "--checkpoint", run, "--out", out, "--min-score", str(cut)) == 0
    assert len(pd.read_csv(tmp_path / "scores.selected.csv")) == int((reference["score"] >= cut).sum())


def test_ties_at_the_cut_are_broken_by_key(tmp_path):
    from elta.workflows.collection import Selection, finish, write_frames

    frame = pd.DataFrame({"path": [f"k{i}" for i in range(10)], "score": [1.0, 5, 5, 5, 2, 3, 5, 4, 1, 2],
                          "error": [""] * 10})  # fmt: skip
    out = write_frames([frame], tmp_path / "s.parquet")
    summary = finish(out, selection=Selection(top=0.3))  # k = 3 of four tied at 5: k1, k2, k3
    assert summary["selection"]["selected"] == 3
    assert pd.read_csv(tmp_path / "s.selected.csv")["path"].tolist() == ["k1", "k2", "k3"]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_tars_and_parquet_lists_score_by_key_with_bad_input_as_rows(run, photos, tmp_path):
    files = sorted((photos / "a").glob("*.jpg"))[:6]
    jpg = [p.read_bytes() for p in files]
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "s-000.tar", [("x/000.jpg", jpg[0]), ("x/000.json", b"{}"), ("x/001.jpg", jpg[1]),
                                ("x/002.txt", b"caption only"), ("x/003.jpg", b"not a jpeg")])  # fmt: skip
    _tar(shards / "s-001.tar", [("x/004.jpg", jpg[2]), ("x/000.jpg", jpg[3])])  # x/000 again: a duplicate
    _tar(shards / "s-002.tar", [])
    table = tmp_path / "list.parquet"
    pd.DataFrame({"id": range(4), "file": [str(files[4]), str(files[5]), str(tmp_path / "gone.jpg"), "notes.md"]}
                 ).to_parquet(table)  # fmt: skip

    out = tmp_path / "scores.jsonl"
    assert (
        _predict(str(shards / "s-*.tar"), table, "--column", "file", "--checkpoint", run, "--out", out) == 0
    )
    rows = _read(out).set_index("path")
    assert rows.index.tolist() == ["x/000", "x/001", "x/002", "x/003", "x/004", "x/000",
                                   str(shards / "s-002.tar"), str(files[4]), str(files[5]),
                                   str(tmp_path / "gone.jpg"), str(table.parent / "notes.md")]  # fmt: skip
    errors = rows["error"].tolist()
    assert errors[0] == errors[1] == errors[4] == errors[7] == errors[8] == ""
    assert "holds no image (members: .txt)" in errors[2]
    assert "not a recognised image" in errors[3]
    assert "duplicate key" in errors[5] and np.isnan(rows["score"].iloc[5])
    assert "empty shard" in errors[6]
    assert "file not found" in errors[9] and "neither a folder nor an image" in errors[10]
    direct = elta.load(run, device="cpu", workers=0).score([files[0], files[1], files[2], files[4], files[5]])
    np.testing.assert_allclose(rows["score"].iloc[[0, 1, 4, 7, 8]], direct["score"], rtol=0, atol=1e-6)
    summary = json.loads((tmp_path / "scores.summary.json").read_text())
    assert (summary["images"], summary["scored"], summary["failed"]) == (11, 5, 6)
    assert summary["failures"]["duplicate key"] == 1 and summary["failures"]["empty shard"] == 1


def test_collection_flags_without_out_and_bad_inputs_are_one_line_errors(run, photos, tmp_path, capsys):
    assert _predict(photos, "--checkpoint", run, "--top", "5%") == 2
    assert "--top needs --out" in capsys.readouterr().err
    assert _predict(str(tmp_path / "none-*.tar"), "--checkpoint", run, "--out", tmp_path / "s.csv") == 2
    assert "matches no file" in capsys.readouterr().err
    assert _predict(photos, "--checkpoint", run, "--out", tmp_path / "s.csv", "--shard", "2/2") == 2
    assert "0 ≤ I < N" in capsys.readouterr().err
    assert (
        _predict(photos, "--checkpoint", run, "--out", tmp_path / "s.csv", "--top", "5%", "--bottom", "1%")
        == 2
    )
    assert "choose one" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _predict(empty, "--checkpoint", run, "--out", tmp_path / "s.csv") == 2
    assert "no image files" in capsys.readouterr().err


def test_predict_runs_one_shard_a_process_under_torchrun(run, photos, reference, tmp_path):
    out = tmp_path / "scores.parquet"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "elta", "predict",
         str(photos), "--checkpoint", str(run), "--out", str(out), "--device", "cpu", "--workers", "0",
         "--batch-size", "32", "--top", "5%"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    merged = _read(out)
    assert merged["path"].tolist() == reference["path"].tolist()
    np.testing.assert_allclose(merged["score"], reference["score"], rtol=0, atol=1e-6)
    assert len(pd.read_csv(tmp_path / "scores.selected.csv")) == round(0.05 * N_IMAGES)
