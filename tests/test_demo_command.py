"""`elta demo` end to end (with a tiny recipe in place of the real one, which takes minutes): it trains,
evaluates on the test split, prints the metrics and says what its model is."""

from __future__ import annotations

import json
import shutil

import elta.workflows.demo as demo
from conftest import tiny_config
from elta.cli import main


def test_demo_trains_evaluates_and_says_what_the_model_is(demo_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    shutil.copytree(demo_data, out / "data")  # an existing demo dataset is reused, not rebuilt
    monkeypatch.setattr(demo, "demo_config", lambda data_dir, device="auto": tiny_config(data_dir))
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "elta demo: test split" in printed and "SRCC" in printed
    assert "not a model of aesthetics" in printed
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == len((demo_data / "test.txt").read_text().split())
    assert (out / "run" / "best.pt").is_file() and (out / "eval" / "report.png").is_file()
