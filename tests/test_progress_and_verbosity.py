"""Progress on long work and how much a command says: -q / -v anywhere, log lines where there is no terminal."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from conftest import tiny_train_args
from elta.progress import progress_bar


def test_progress_is_logged_with_rate_and_eta_when_stderr_is_not_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="elta.progress"):
        bar = progress_bar(range(4), desc="scoring", unit="batch", enabled=True, every_s=0.0)
        assert list(bar) == [0, 1, 2, 3]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("scoring: 1/4 (25%) batch, ") and "batch/s, ETA " in lines[0]
    assert lines[-1].startswith("scoring: 4/4 (100%) batch") and len(lines) == 4  # the last count once
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="elta.progress"):
        list(progress_bar(range(4), desc="scoring", enabled=False, every_s=0.0))
    assert not caplog.records


def test_quiet_and_verbose_work_after_the_command_name_too(demo_data, tmp_path):
    def elta(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "elta", *args]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )

    quiet = elta(*tiny_train_args(demo_data, tmp_path / "quiet"), "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert "epoch 1/1" not in quiet.stderr  # nothing but warnings on the console ...
    assert "epoch 1/1" in (tmp_path / "quiet" / "train.log").read_text()  # ... and a complete train.log
    loud = elta(*tiny_train_args(demo_data, tmp_path / "loud"))
    assert "epoch 1/1" in loud.stderr
    checked = elta("data", "check", "--data", str(demo_data / "AVA.txt"), "--quick", "-v")
    assert checked.returncode == 0 and "0 problem(s)" in checked.stdout
    scored = elta(
        "predict", "--checkpoint", str(tmp_path / "quiet"), str(demo_data / "images" / "1.jpg"), "-q"
    )
    assert scored.returncode == 0 and scored.stdout.splitlines()[0].startswith("path,score,std,p1")
    assert scored.stderr == ""
