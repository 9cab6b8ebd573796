"""Training on two torchrun "nodes" on this machine: c10d rendezvous on 127.0.0.1, gloo, one process a node.

Each node is its own torchrun launcher, started separately as on two machines. The run must equal the
single-node run with two processes, and a node killed in the middle leaves a ``last.pt`` that ``--resume``
(again on two nodes) finishes with the uninterrupted run's weights.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import free_port
from elta.models.checkpoint import load_checkpoint
from test_distributed import _train_args, kill_launcher_and_workers, quiet_env, torchrun

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds workers in /proc (Linux)")


def _node(port: int, run_id: str, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
               "--max-restarts", "0", *args]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=quiet_env()
    )


def _two_nodes(run_id: str, *args: str, timeout: float = 300) -> None:
    port = free_port()
    nodes = [_node(port, run_id, *args) for _ in range(2)]
    for node in nodes:
        try:
            _, err = node.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for n in nodes:
                n.kill()
            pytest.fail(f"a node did not finish in {timeout} s")
        assert node.returncode == 0, err[-3000:]


def _same_weights(a: Path, b: Path, exact: bool) -> None:
    wa, wb = load_checkpoint(a).weights, load_checkpoint(b).weights
    assert wa.keys() == wb.keys()
    for key in wa:
        if exact:
            assert torch.equal(wa[key], wb[key]), key
        else:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6, msg=key)


def test_two_nodes_train_as_one_node_with_two_processes_and_resume_after_a_node_dies(demo_data, tmp_path):
    one_node = tmp_path / "one_node"
    done = subprocess.run(torchrun("-m", "elta", *_train_args(demo_data, one_node)), capture_output=True,
                          text=True, timeout=300, env=quiet_env())  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    two_nodes = tmp_path / "two_nodes"
    _two_nodes("full", "-m", "elta", *_train_args(demo_data, two_nodes))
    columns = ["epoch", "val_srcc", "val_plcc", "val_mae", "val_emd", "val_acc"]
    pd.testing.assert_frame_equal(pd.read_csv(one_node / "metrics.csv")[columns],
                                  pd.read_csv(two_nodes / "metrics.csv")[columns], rtol=1e-5)  # fmt: skip
    _same_weights(one_node / "last.pt", two_nodes / "last.pt", exact=False)

    # Kill one node in the middle: the other stops too (its peer is gone); the run resumes on two nodes.
    run = tmp_path / "killed"
    port = free_port()
    nodes = [_node(port, "killed", "-m", "elta", *_train_args(demo_data, run)) for _ in range(2)]
    deadline = time.time() + 180
    while not (run / "last.pt").exists() and time.time() < deadline and nodes[1].poll() is None:
        time.sleep(0.01)
    kill_launcher_and_workers(nodes[1])
    try:
        nodes[0].communicate(timeout=120)
    except subprocess.TimeoutExpired:
        kill_launcher_and_workers(nodes[0])
        pytest.fail("the surviving node did not stop within 120 s of its peer's death")
    assert nodes[0].returncode != 0
    stopped = load_checkpoint(run / "last.pt")
    assert (stopped.training["epoch"], stopped.training["step"]) < (2, 0), "finished before the kill"

    _two_nodes("resumed", "-m", "elta", "train", "--resume", str(run))
    _same_weights(two_nodes / "last.pt", run / "last.pt", exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(two_nodes / "metrics.csv").drop(columns="time_s"),
                                  pd.read_csv(run / "metrics.csv").drop(columns="time_s"))  # fmt: skip
