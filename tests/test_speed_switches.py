"""Speed switches: the image cache, JPEG draft decoding, mixed precision, channels-last and compile."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import elta
from conftest import reference_and_resumed, tiny_config, tiny_train_args
from elta.cli import main
from elta.config import RunConfig, RuntimeConfig
from elta.data.annotations import read_annotations
from elta.data.cache import CACHE_MARKER, build_cache, check_cache_fits
from elta.data.images import load_image
from elta.data.transforms import ImageTransform
from elta.engine.trainer import train
from elta.models.checkpoint import load_checkpoint


def _photo(width: int, height: int) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BICUBIC)


# ------------------------------------------------------------------------------------------- image cache


def test_cache_serves_training_and_evaluation_through_images(demo_data, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert (
        main(["data", "cache", "--data", str(demo_data / "AVA.txt"), "--out", str(cache), "--size", "56"])
        == 0
    )
    assert "cached 90 images (90 written" in capsys.readouterr().out
    marker = json.loads((cache / CACHE_MARKER).read_text())
    assert (marker["size"], marker["mode"], marker["complete"], marker["images"]) == (56, "square", True, 90)
    index = pd.read_csv(cache / "index.csv", dtype={"image": str})
    assert len(index) == 90 and (index["width"] == 56).all() and (index["source_width"] == 64).all()
    with Image.open(cache / index["image"].iloc[0]) as img:
        assert (img.format, img.size) == ("JPEG", (56, 56))

    run = tmp_path / "run"
    assert main([*tiny_train_args(demo_data, run), "--images", str(cache)]) == 0
    assert "reading images from the cache" in (run / "train.log").read_text()
    assert pd.read_csv(run / "metrics.csv")["train_loss"].notna().all()
    assert not (run / "bad_rows.csv").exists()
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--checkpoint",
        str(run),
        "--data",
        str(demo_data / "AVA.txt"),
        "--images",
        str(cache),
    ]
    assert main([*args, "--out", str(out), "--device", "cpu", "--workers", "0"]) == 0
    assert json.loads((out / "metrics.json").read_text())["skipped"] == 0


def test_cache_lists_unreadable_images_and_updates_only_changed_sources(demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    annotations = read_annotations(data / "AVA.txt")
    df = annotations.frame
    broken, changed = df["path"].iloc[3], df["path"].iloc[5]
    with open(broken, "r+b") as fh:  # a truncated JPEG
        fh.truncate(200)
    cache = tmp_path / "cache"
    first = build_cache(annotations, cache, size=32, workers=2)
    assert (first["images"], first["written"], first["bad"]) == (89, 89, 1)
    bad = pd.read_csv(cache / "bad_images.csv")
    assert bad["path"].tolist() == [broken] and bad["row"].tolist() == [int(df["row"].iloc[3])]
    assert "unreadable" in bad["reason"].iloc[0]

    again = build_cache(annotations, cache, size=32)
    assert (again["written"], again["reused"]) == (0, 89)
    _photo(80, 60).save(changed)
    os.utime(changed, ns=(10**18, 10**18))
    updated = build_cache(annotations, cache, size=32)
    assert (updated["written"], updated["reused"]) == (1, 88)
    with Image.open(cache / os.path.relpath(changed, data / "images")) as img:
        assert img.size == (32, 32)
    resized = build_cache(annotations, cache, size=24)  # other settings: everything is rebuilt
    assert resized["written"] == 89


def test_short_mode_keeps_the_aspect_and_the_relative_paths(tmp_path):
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    _photo(120, 80).save(images / "sub" / "wide.jpg", quality=95)
    _photo(30, 50).save(images / "small.png")
    _photo(64, 64).save(images / "square.jpg", quality=95)
    csv = tmp_path / "scores.csv"
    csv.write_text("image,mos\nsub/wide.jpg,3.5\nsmall.png,2.0\nsquare.jpg,4.0\n")
    annotations = read_annotations(csv, "csv", images)
    summary = build_cache(annotations, tmp_path / "cache", size=40, mode="short")
    assert summary["images"] == 3
    with Image.open(tmp_path / "cache" / "sub" / "wide.jpg") as img:
        assert (img.format, img.size) == ("JPEG", (60, 40))
    with Image.open(tmp_path / "cache" / "small.png") as img:  # never enlarged; PNG stays PNG
        assert (img.format, img.size) == ("PNG", (30, 50))
    cached = read_annotations(csv, "csv", tmp_path / "cache").frame
    assert all(os.path.isfile(p) for p in cached["path"])


def test_cache_refuses_to_write_into_a_foreign_folder_or_from_a_cache(demo_data, tmp_path):
    annotations = read_annotations(demo_data / "AVA.txt")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an elta cache"):
        build_cache(annotations, foreign)
    with pytest.raises(ValueError, match="image folder itself"):
        build_cache(annotations, demo_data / "images")
    with pytest.raises(ValueError, match="mode"):
        build_cache(annotations, tmp_path / "c", mode="letterbox")
    build_cache(replace(annotations, frame=annotations.frame.head(4)), tmp_path / "c", size=16)
    cached = read_annotations(demo_data / "AVA.txt", images=tmp_path / "c")
    with pytest.raises(ValueError, match="already an elta cache"):
        build_cache(cached, tmp_path / "c2")


def test_a_cache_smaller_than_the_run_needs_is_reported(demo_data, tmp_path, caplog):
    annotations = read_annotations(demo_data / "AVA.txt")
    build_cache(replace(annotations, frame=annotations.frame.head(4)), tmp_path / "c", size=32)
    with caplog.at_level(logging.INFO, logger="elta"):
        assert check_cache_fits(tmp_path / "c", 56).size == 32
    assert "upsampled" in caplog.text and "--size 56" in caplog.text
    assert check_cache_fits(demo_data / "images", 56) is None


# ------------------------------------------------------------------------------------------ draft decoding


def test_draft_decoding_of_a_large_jpeg_stays_at_least_the_target(tmp_path):
    path = tmp_path / "large.jpg"
    _photo(1600, 1200).save(path, quality=92)
    full = load_image(path)
    for target in (300, 256, 150):
        small = load_image(path, target=target)
        assert min(small.size) >= target and small.size[0] < full.size[0]
    # the transform output hardly changes: on average well under one grey level
    transform = ImageTransform(256, 300, (0.5,) * 3, (0.5,) * 3, train=True)
    diff = transform(full, 7) - transform(load_image(path, target=transform.needed_size), 7)
    assert float(diff.abs().mean()) < 0.02


def test_images_under_twice_the_target_decode_unchanged(tmp_path):
    path = tmp_path / "medium.jpg"
    _photo(590, 450).save(path, quality=92)
    assert np.array_equal(np.asarray(load_image(path, target=300)), np.asarray(load_image(path)))
    png = tmp_path / "large.png"
    _photo(1200, 900).save(png)
    assert load_image(png, target=100).size == (1200, 900)


# ------------------------------------------------------------------------------ precision, format, compile


@pytest.mark.parametrize(("amp", "channels_last"), [("bf16", False), ("off", True), ("bf16", True)])
def test_bf16_and_channels_last_train_with_finite_losses(demo_data, tmp_path, amp, channels_last):
    train(
        tiny_config(demo_data, image_size=32, runtime={"amp": amp, "channels_last": channels_last}),
        tmp_path / "run",
    )
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert all(math.isfinite(metrics[c].iloc[0]) for c in ("train_loss", "val_loss", "val_srcc"))
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(v.dtype == torch.float32 for v in saved.weights.values() if v.is_floating_point())
    assert "scaler" in saved.training
    log = (tmp_path / "run" / "train.log").read_text()
    assert ("bf16" if amp == "bf16" else "fp32") in log and ("channels-last" in log) == channels_last


def test_bf16_run_stopped_after_an_epoch_resumes_to_the_same_weights(demo_data, tmp_path):
    cfg = tiny_config(demo_data, epochs=2, image_size=32, runtime={"amp": "bf16"})
    reference, resumed = reference_and_resumed(cfg, tmp_path)
    a, b = reference.weights, resumed.weights
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_scoring_is_close_to_float32(demo_data, tmp_path):
    train(tiny_config(demo_data, image_size=32), tmp_path / "run")
    photos = sorted((demo_data / "images").iterdir())[:8]
    exact = elta.load(tmp_path / "run", device="cpu", workers=0).score(photos)
    fast = elta.load(tmp_path / "run", device="cpu", workers=0, amp="bf16").score(photos)
    assert (fast["error"] == "").all()
    assert np.allclose(fast["score"], exact["score"], atol=0.1)


def test_fp16_on_the_cpu_is_refused_with_the_fix(demo_data, tmp_path, capsys):
    assert main([*tiny_train_args(demo_data, tmp_path / "run"), "--amp", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "--amp fp16 needs a CUDA GPU" in err and "--amp bf16 or off" in err


def test_switches_are_validated_and_read_from_the_command_line(demo_data, tmp_path):
    with pytest.raises(ValueError, match=r"runtime.amp \(--amp\) must be one of auto, bf16, fp16, off"):
        RuntimeConfig(amp="fp8")
    assert RuntimeConfig().amp == "auto" and not RuntimeConfig().compile and not RuntimeConfig().channels_last
    cfg = RunConfig.from_dict({"runtime": {"amp": "bf16", "compile": True, "channels_last": True}})
    assert (cfg.runtime.amp, cfg.runtime.compile, cfg.runtime.channels_last) == ("bf16", True, True)
    from elta.cli import build_parser
    from elta.cli.options import apply_options

    args = build_parser().parse_args([*tiny_train_args(demo_data, tmp_path), "--compile", "--channels-last"])
    parsed = apply_options(RunConfig(), args).runtime
    assert (parsed.compile, parsed.channels_last, parsed.amp) == (True, True, "auto")


def test_compile_without_a_compiler_stack_fails_clearly(demo_data, tmp_path, monkeypatch):
    # Compiling even the tiny backbone takes minutes on a 2-core CPU, so only the refusal is tested here.
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(RuntimeError, match="--compile: torch.compile is not available"):
        train(tiny_config(demo_data, image_size=32, runtime={"compile": True}), tmp_path / "run")
