"""`elta serve` as a real process on 127.0.0.1 for the load and browser tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from conftest import free_port


def calibrated_run(data_root: Path, root: Path) -> tuple[Path, Path]:
    """A tiny trained run in ``root/run`` and a copy of its best.pt with an affine calibration map fitted on the
    val split (so a page or an answer shows both scores)."""
    from conftest import tiny_config
    from elta.cli import main
    from elta.engine.trainer import train

    train(tiny_config(data_root), root / "run")
    calibrated = root / "calibrated.pt"
    args = ["calibrate", "--checkpoint", str(root / "run"), "--method", "affine", "--out", str(calibrated)]
    assert main([*args, "--device", "cpu", "--workers", "0"]) == 0
    return root / "run", calibrated


@contextmanager
def running_server(checkpoint: Path, log: Path, *options: str, start_timeout: float = 90.0):
    """Start ``elta serve`` on a free port, wait until /healthz answers, yield (base URL, process); SIGTERM after."""
    port = free_port()
    src = Path(__file__).resolve().parent.parent / "src"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = [sys.executable, "-m", "elta", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*command, "--device", "cpu", *options], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"elta serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"elta serve did not answer in {start_timeout:.0f} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
