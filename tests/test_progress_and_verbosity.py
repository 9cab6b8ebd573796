"""Progress on long work and how much a command says: -q / -v anywhere, log lines where there is no terminal."""

from __future__ import annotations

import logging

from conftest import tiny_train_args
from elta.cli import main
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


def test_quiet_and_verbose_work_after_the_command_name_too(demo_data, tmp_path, capsys):
    args = tiny_train_args(demo_data, tmp_path / "run")
    assert main([*args, "-q"]) == 0
    assert main(["data", "check", "--data", str(demo_data / "AVA.txt"), "--quick", "-v"]) == 0
    assert logging.getLogger("elta").level == logging.DEBUG
    assert main(["-q", "data", "check", "--data", str(demo_data / "AVA.txt"), "--quick"]) == 0
    assert logging.getLogger("elta").level == logging.WARNING
    capsys.readouterr()
    assert (
        main(["predict", "--checkpoint", str(tmp_path / "run"), str(demo_data / "images" / "1.jpg"), "-q"])
        == 0
    )
    assert capsys.readouterr().out.splitlines()[0].startswith("path,score,std,p1")
