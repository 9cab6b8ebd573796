"""Tuning workers sharing one study in a real PostgreSQL server (Debian's postgresql, started per module).

The server runs from a throw-away data folder on a free loopback port; initdb refuses root, so as root the
server runs as the ``postgres`` system user. Without PostgreSQL the tests skip, except under CI, where
``.ci/run`` installs it and a missing server is a failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port, tiny_train_args

optuna = pytest.importorskip("optuna")
pytest.importorskip("psycopg")

TRIALS = 6


def _postgres_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def postgres_url():
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="elta-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the server runs as the postgres system user
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth", "trust", "-E", "UTF8"],
                   check=True, capture_output=True)  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True)  # fmt: skip
    try:
        subprocess.run([*as_user, _postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                        "postgres", "elta"], check=True, capture_output=True)  # fmt: skip
        yield f"postgresql://postgres@127.0.0.1:{port}/elta"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _worker(demo_data, out: Path, url: str, study: str, epochs: int, extra=()) -> subprocess.Popen:
    args = tiny_train_args(demo_data, out, epochs=epochs)
    command = [sys.executable, "-m", "elta", "tune", *args[1:], "--trials", str(TRIALS), "--freeze-backbone",
               "--cache-features", "--storage", url, "--study-name", study, *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"a tune worker did not finish in {timeout} s:\n{err[-3000:]}")
    return proc.returncode, err


def _trials(url: str, study: str):
    from elta.workflows.tune import database_url

    return optuna.load_study(study_name=study, storage=database_url(url)).get_trials(deepcopy=False)


def _finished(trials) -> list:
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]


def _check_folders(trials, out: Path) -> None:
    """Every trial that ran has its own folder, holding its own settings."""
    ran = [t for t in trials if "run_dir" in t.user_attrs]
    folders = [t.user_attrs["run_dir"] for t in ran]
    assert len(folders) == len(set(folders)), "a trial folder was used twice"
    for t in _finished(trials):
        assert (Path(t.user_attrs["run_dir"]) / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "trials").iterdir()) == sorted(Path(f).name for f in folders)


def test_two_workers_started_together_share_one_study(demo_data, postgres_url, tmp_path):
    out = tmp_path / "tune"  # one folder for both, as on a shared file system
    workers = [_worker(demo_data, out, postgres_url, "together", epochs=6) for _ in range(2)]
    results = [_finish(w) for w in workers]
    for code, err in results:
        assert code == 0, err[-3000:]
    trials = _trials(postgres_url, "together")
    assert len(_finished(trials)) == TRIALS
    assert all(t.state.name != "RUNNING" for t in trials)
    _check_folders(trials, out)
    assert (out / "best.yaml").is_file() and (out / "trials.csv").is_file()
    best = max(_finished(trials), key=lambda t: t.value if t.value is not None else float("-inf"))
    assert f"trial {best.number}" in (out / "best.yaml").read_text()
    # both workers ran trials: the study really was shared
    assert len({t.user_attrs["worker"] for t in _finished(trials)}) == 2


def test_a_killed_workers_trial_is_failed_after_the_grace_period_and_retried(
    demo_data, postgres_url, tmp_path
):
    heartbeat = ["--heartbeat-interval", "1", "--heartbeat-grace", "4", "--pruner", "none"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"  # one folder each, as on two machines
    victim = _worker(demo_data, out_a, postgres_url, "killed", epochs=40, extra=heartbeat)
    survivor = _worker(demo_data, out_b, postgres_url, "killed", epochs=40, extra=heartbeat)
    deadline = time.time() + 180
    while time.time() < deadline and victim.poll() is None:  # kill the victim in the middle of a trial
        if (out_a / "trials").is_dir() and any((out_a / "trials").glob("*/metrics.csv")):
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the victim finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.time()

    code, err = _finish(survivor)
    assert code == 0, err[-3000:]
    trials = _trials(postgres_url, "killed")
    assert len(_finished(trials)) == TRIALS
    lost = [t for t in trials if t.state.name == "FAIL" and not t.user_attrs.get("surplus")]
    assert len(lost) == 1 and Path(lost[0].user_attrs["run_dir"]).parent == out_a / "trials"
    # failed by the survivor once its heartbeat had been silent for the grace period
    assert lost[0].datetime_complete.timestamp() >= killed_at + 4 - 1.5
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == lost[0].number]
    assert len(retried) == 1 and retried[0].params == lost[0].params
    assert all(t.state.name != "RUNNING" for t in trials)


def test_unreachable_database_and_missing_driver_are_one_line_errors(
    demo_data, tmp_path, monkeypatch, capsys
):
    from elta.cli import main

    args = [*tiny_train_args(demo_data, tmp_path / "t")[1:], "--trials", "1", "--freeze-backbone"]
    url = f"postgresql://elta:secret@127.0.0.1:{free_port()}/nowhere"
    assert main(["tune", *args, "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot open the study database" in err
    assert "secret" not in err and "127.0.0.1" in err

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the driver were not installed
    assert main(["tune", *args, "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "elta[postgres]"' in err
