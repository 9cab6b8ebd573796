"""Distributed training (torchrun, gloo on CPUs): the global-batch step, sharded validation, resume."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import tiny_train_args
from elta.engine.distributed import Processes
from elta.engine.trainer import StepForward
from elta.models.checkpoint import load_checkpoint

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from step_inputs import make_inputs, make_model_and_enhancers  # noqa: E402


def torchrun(*args: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(processes), *args]  # fmt: skip


def quiet_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("n", [0, 1, 5, 7, 16])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shares_cover_a_batch_once_and_differ_by_at_most_one(n, world):
    shares = [Processes(rank=r, world_size=world).share(range(n)) for r in range(world)]
    assert [i for share in shares for i in share] == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_two_process_step_has_the_single_process_gradient(tmp_path):
    """Main loss over the global weight sum, FLSA over the gathered batch, FDS statistics of the global
    batch: the averaged gradient of 2 processes (3 + 4 rows) is the gradient of one process on all 7."""
    run = subprocess.run(
        torchrun(str(HELPERS / "distributed_step.py"), str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
        env=quiet_env(),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [len(r["rows"]) for r in ranks] == [3, 4]

    model, enhancers = make_model_and_enhancers()
    inputs = make_inputs()
    step = StepForward(model, enhancers, model.forward_features)
    terms = step(inputs["images"], inputs["mos"], inputs["dist"], inputs["weight"], inputs["indices"], 0)
    terms["loss"].backward()

    for rank in ranks:  # DDP leaves every process with the same averaged gradient
        for name, param in model.named_parameters():
            torch.testing.assert_close(rank["grads"][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
        for name, value in enhancers.state_dict().items():
            torch.testing.assert_close(rank["enhancers"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # the logged loss is the mean over processes of their terms: the global batch's value
    for key in ("main", "flsa"):
        mean = sum(float(r["terms"][key]) for r in ranks) / 2
        assert mean == pytest.approx(float(terms[key].detach()), rel=1e-5), key
    assert float(ranks[0]["terms"]["flsa"]) == pytest.approx(float(ranks[1]["terms"]["flsa"]))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def kill_launcher_and_workers(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its worker processes (which it starts in sessions of their own)."""
    workers = _children(proc.pid)
    assert workers, "torchrun had no worker processes"
    proc.kill()
    proc.wait()
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 30
    while any(_running(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.01)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a killed worker may stay a zombie until its new parent reaps it


def _train_args(demo_data, out, epochs=2) -> list[str]:
    args = tiny_train_args(demo_data, out, backbone="test_resnet", epochs=epochs)  # BatchNorm inside
    return [*args, "--tfa", "--flsa-weight", "1", "--checkpoint-every", "1"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers in /proc (Linux)")
def test_torchrun_training_validates_every_sample_once_and_resumes(demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    victims = {}  # a training and a validation image whose data is cut short: they fail when decoded
    for split in ("train", "val"):
        image_id = (data / f"{split}.txt").read_text().split()[0]
        victim = data / "images" / f"{image_id}.jpg"
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        victims[split] = image_id

    reference = tmp_path / "reference"
    done = subprocess.run(
        torchrun("-m", "elta", *_train_args(data, reference)),
        capture_output=True,
        text=True,
        timeout=300,
        env=quiet_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("best srcc") == 1  # rank 0 alone prints and writes
    assert sorted(p.name for p in reference.iterdir()) == [
        "bad_rows.csv", "best.pt", "config.yaml", "last.pt", "metrics.csv", "split.csv", "train.log",
    ]  # fmt: skip
    # whichever process met them, the broken images are listed once each (by rank 0)
    bad = pd.read_csv(reference / "bad_rows.csv", dtype={"image_id": str})
    assert sorted(bad["image_id"]) == sorted(victims.values())
    metrics = pd.read_csv(reference / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]

    # The run's last validation equals a single-process evaluation of its checkpoint on the same rows:
    # every validation image was scored once (no shard lost or padded with repeats).
    evaluated = tmp_path / "eval"
    subprocess.run(
        [sys.executable, "-m", "elta", "evaluate", "--checkpoint", str(reference / "last.pt"),
         "--split", "val", "--out", str(evaluated), "--device", "cpu", "--workers", "0"],
        check=True, capture_output=True, env=quiet_env(), timeout=300,
    )  # fmt: skip
    single = json.loads((evaluated / "metrics.json").read_text())
    split = pd.read_csv(reference / "split.csv")
    assert single["skipped"] == 1
    assert single["n"] == (split["split"] == "val").sum() - 1
    last = metrics.iloc[-1]
    assert last["val_srcc"] == pytest.approx(single["srcc"], abs=1e-12)
    for key in ("plcc", "mae", "emd", "acc"):
        assert last[f"val_{key}"] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key

    # Kill every process in the middle, resume with torchrun, and end with the same weights.
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        torchrun("-m", "elta", *_train_args(data, run)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=quiet_env(),
    )
    deadline = time.time() + 120
    while not (run / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    kill_launcher_and_workers(proc)
    stopped = load_checkpoint(run / "last.pt")
    assert (stopped.training["epoch"], stopped.training["step"]) < (2, 0), (
        "the run finished before it could be killed"
    )
    resumed = subprocess.run(
        torchrun("-m", "elta", "train", "--resume", str(run)),
        capture_output=True,
        text=True,
        timeout=300,
        env=quiet_env(),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(reference / "last.pt").weights, load_checkpoint(run / "last.pt").weights
    for key in a:
        assert torch.equal(a[key], b[key]), key
    pd.testing.assert_frame_equal(
        pd.read_csv(reference / "metrics.csv").drop(columns="time_s"),
        pd.read_csv(run / "metrics.csv").drop(columns="time_s"),
    )


def test_only_train_and_predict_run_under_torchrun(monkeypatch, capsys):
    from elta.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["evaluate", "--checkpoint", "run/best.pt", "--out", "out"]) == 2
    assert "only `elta train` and `elta predict` run distributed" in capsys.readouterr().err
