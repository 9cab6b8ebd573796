"""The benchmark scripts still run against the current code (tiny settings; the figures are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"

RUNS = {
    "export_speed.py": (
        [
            "--quick",
            "--images",
            "4",
            "--batch-sizes",
            "2",
            "--calibration-images",
            "4",
            "--width",
            "320",
            "--height",
            "240",
            "--no-bf16",
        ],
        "| test_convnext @48 | 2 | ONNX Runtime INT8 |",
    ),  # fmt: skip
    "enhancer_overhead.py": (
        [
            "--backbone",
            "test_vit",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--steps",
            "2",
            "--device",
            "cpu",
        ],
        "ratio tfa+flsa / baseline",
    ),
    "train_step.py": (
        ["--backbones", "test_resnet:32:8", "--quick", "--device", "cpu"],
        "| test_resnet | 32 px | 8 |",
    ),
    "input_pipeline.py": (["--images", "6", "--repeats", "1", "--workers", "0"], "(d) elta, from the cache"),
    "serve_load.py": (["--quick"], "throughput batching on / off at 4 clients"),
    "bulk_scoring.py": (["--quick", "--no-ray"], "| (c) --shard 0/2 + 1/2 at once, then merge-scores |"),
    "predict_throughput.py": (
        ["--images", "6", "--repeats", "1", "--batch-size", "4", "--no-cli", "--device", "cpu"],
        "(b) elta predict (Predictor)",
    ),
}


@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_script_runs(script):
    args, expected = RUNS[script]
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout, done.stdout[-2000:]


def test_plain_loop_reference_runs(demo_data):
    args = ["--data", str(demo_data), "--backbone", "test_convnext", "--weights", "none", "--epochs", "1",
            "--image-size", "48", "--batch-size", "16"]  # fmt: skip
    done = subprocess.run([sys.executable, str(BENCHMARKS / "plain_loop.py"), *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "plain loop, test_convnext @ 48 px, 1 epochs" in done.stdout and "| mae_high " in done.stdout
