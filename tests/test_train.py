"""Training runs end to end on a small real dataset: outputs, exact resume after a kill, failure paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml

from conftest import tiny_config, tiny_train_args
from elta.config import RunConfig
from elta.engine import trainer as train_module
from elta.engine.trainer import RunExistsError, TrainingDivergedError, train
from elta.models.checkpoint import load_checkpoint


def test_training_writes_a_complete_run_directory(demo_data, tmp_path):
    seen = []
    summary = train(
        tiny_config(demo_data, epochs=2),
        tmp_path / "run",
        on_epoch=lambda e, row: seen.append((e, row["val_srcc"])),
    )
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "last.pt", "best.pt", "train.log", "split.csv"):
        assert (run / name).is_file(), name
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2]
    assert [e for e, _ in seen] == [1, 2] and seen[1][1] == pytest.approx(metrics["val_srcc"].iloc[1])
    assert {"train_loss", "val_loss", "val_srcc", "val_plcc", "val_acc", "val_mae_low", "lr"} <= set(metrics)
    assert metrics["train_loss"].notna().all()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["backbone"] == "test_convnext"
    # saved with the recipe's values filled in: the run reproduces whatever the defaults become
    assert RunConfig.from_yaml(run / "config.yaml") == tiny_config(demo_data, epochs=2).resolved()
    assert saved["train"]["recipe"] == "finetune" and saved["train"]["optimizer"] == "adamw"
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt.spec.centers == [float(c) for c in range(1, 11)]
    assert ckpt.spec.acc_threshold == 5.0
    assert ckpt.spec.head == "distribution"
    assert ckpt.training["epoch"] == summary["best_epoch"]
    # the demo data has split lists: the run trains on train and validates on val
    split = pd.read_csv(run / "split.csv")
    listed = set((demo_data / "val.txt").read_text().split())
    assert set(split.loc[split["split"] == "val", "image_id"].astype(str)) == listed


def test_existing_run_is_not_overwritten(demo_data, tmp_path):
    cfg = tiny_config(demo_data, epochs=1)
    train(cfg, tmp_path / "run")
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(RunExistsError, match="--resume"):
        train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def _state(path):
    return load_checkpoint(path).weights


def test_killed_run_resumes_to_the_same_weights(demo_data, tmp_path):
    """SIGKILL a CLI run in the middle, resume it, and end exactly where an uninterrupted run ends."""
    reference = tmp_path / "reference"
    train(tiny_config(demo_data, epochs=3), reference)

    run = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "elta",
        *tiny_train_args(demo_data, run, epochs=3),
        "--checkpoint-every",
        "1",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    deadline = time.time() + 120
    while not (run / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # at once: the whole run takes well under a second on a quiet machine
    proc.wait()
    stopped_at = load_checkpoint(run / "last.pt")
    assert (stopped_at.training["epoch"], stopped_at.training["step"]) < (3, 0), (
        "the run finished before it could be killed"
    )

    resumed = subprocess.run(
        [sys.executable, "-m", "elta", "train", "--resume", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = _state(reference / "last.pt"), _state(run / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ref_metrics = pd.read_csv(reference / "metrics.csv").drop(columns="time_s")
    run_metrics = pd.read_csv(run / "metrics.csv").drop(columns="time_s")
    pd.testing.assert_frame_equal(ref_metrics, run_metrics)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(demo_data, tmp_path, monkeypatch):
    real_loss = train_module.main_loss
    calls = {"n": 0}
    steps_per_epoch = len(train_module.epoch_batches(63, 16, 0, 0))

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] > steps_per_epoch else loss

    monkeypatch.setattr(train_module, "main_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match="nan at epoch 2, step 1.*last good checkpoint"):
        train(tiny_config(demo_data, epochs=3), run)
    kept = load_checkpoint(run / "last.pt")
    assert kept.training["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in kept.weights.values() if v.is_floating_point())


def test_scalar_dataset_trains_a_scalar_head_and_refuses_emd(tmp_path, demo_data):
    ava = pd.read_csv(demo_data / "AVA.txt", sep=" ", header=None)
    votes = ava.iloc[:, 2:12].to_numpy()
    mos = (votes * range(1, 11)).sum(1) / votes.sum(1)
    csv = tmp_path / "scores.csv"
    pd.DataFrame({"image": [f"{i}.jpg" for i in ava[1]], "score": mos}).to_csv(csv, index=False)
    cfg = tiny_config(demo_data, epochs=1)
    cfg = cfg.override("data", data=str(csv), images=str(demo_data / "images"), score_range=(1.0, 10.0))
    train(cfg, tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt.spec.head == "scalar"
    assert "no validation split" in (tmp_path / "run" / "train.log").read_text()
    with pytest.raises(ValueError, match="--loss emd needs vote distributions"):
        train(cfg.override("train", loss="emd"), tmp_path / "run2")


def test_unreadable_training_image_is_reported_then_skipped(demo_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    train_ids = (data / "train.txt").read_text().split()
    (data / "images" / f"{train_ids[0]}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (data / "images" / f"{train_ids[1]}.jpg").unlink()
    cfg = tiny_config(data, epochs=1)
    train(cfg, tmp_path / "run")
    bad = pd.read_csv(tmp_path / "run" / "bad_rows.csv")
    assert {str(train_ids[0]), str(train_ids[1])} <= set(bad["image_id"].astype(str))
    assert (bad["file"] == "AVA.txt").all()
    with pytest.raises(ValueError, match="strict"):
        train(cfg.override("data", strict=True), tmp_path / "strict")


def test_loader_workers_change_nothing_but_speed(demo_data, tmp_path):
    """Two worker processes that live across epochs augment each epoch as in-process loading does."""
    train(tiny_config(demo_data, epochs=2), tmp_path / "in_process")
    cfg = tiny_config(demo_data, epochs=2)
    cfg.runtime.workers = 2
    train(cfg, tmp_path / "workers")
    a, b = _state(tmp_path / "in_process" / "last.pt"), _state(tmp_path / "workers" / "last.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_one_loader_serves_every_epoch_with_that_epochs_augmentation(demo_data):
    from elta.data.dataset import AnnotationDataset, EpochBatchSampler
    from elta.data.transforms import ImageTransform
    from elta.engine.prepare import read_dataset
    from elta.engine.runtime import Runtime

    frame = read_dataset(tiny_config(demo_data)).frame.head(6).reset_index(drop=True)
    transform = ImageTransform(48, 56, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=True)
    dataset = AnnotationDataset(frame, transform, seed=5)
    sampler = EpochBatchSampler()
    loader = Runtime(workers=2).loader(dataset, persistent=True, batch_sampler=sampler)
    seen = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch, [[0, 1, 2], [3, 4, 5]])
        seen[epoch] = torch.cat([batch.images for batch in loader])
        expected = torch.stack([dataset[(i, epoch)]["image"] for i in range(6)])
        assert torch.equal(seen[epoch], expected)
    assert not torch.equal(seen[0], seen[1])  # random crops and flips change with the epoch


def test_best_checkpoint_holds_only_weights_and_evaluates(demo_data, tmp_path):
    from elta.cli import main

    run = tmp_path / "run"
    train(tiny_config(demo_data, train={"optimizer": "adam"}), run)
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert not {"optimizer", "scheduler", "scaler", "enhancers"} & set(best.training)
    assert {"optimizer", "scheduler", "scaler", "enhancers", "step"} <= set(last.training)
    assert (run / "best.pt").stat().st_size <= (run / "last.pt").stat().st_size / 2
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(demo_data / "AVA.txt")]
    assert main([*args, "--out", str(out), "--device", "cpu", "--workers", "0"]) == 0
    assert (out / "metrics.json").is_file()


def test_enhancer_that_needs_a_scalar_head_picks_it_under_auto_and_refuses_emd():
    from elta.enhancers import scalar_head_users
    from elta.models.heads import resolve_loss

    users = scalar_head_users([{"name": "tfa"}, {"name": "bmc"}])
    assert users == ["bmc"]
    assert resolve_loss("auto", True, users) == "mse" and resolve_loss("auto", True, []) == "emd"
    assert resolve_loss("l1", True, users) == "l1"
    with pytest.raises(ValueError, match="bmc needs a scalar head"):
        resolve_loss("emd", True, users)
