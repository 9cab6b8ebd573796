"""Every registered enhancer trains for an epoch with its default settings: a finite loss that is the sum of its
logged terms, finite validation metrics, the head it needs, and the config that names it.

Parametrised over the registry, so a new enhancer is tested as soon as it is registered.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml

from conftest import tiny_config
from elta.engine.trainer import train
from elta.enhancers import ENHANCERS
from elta.models.checkpoint import load_checkpoint


@pytest.mark.parametrize("name", sorted(ENHANCERS))
def test_registered_enhancer_trains_one_epoch_with_its_defaults(demo_data, tmp_path, name):
    run = tmp_path / "run"
    summary = train(tiny_config(demo_data, enhancers=[{"name": name}]), run)
    row = pd.read_csv(run / "metrics.csv").iloc[0]
    terms = [k for k in row.index if k.startswith("train_") and k != "train_loss"]
    assert terms, "no loss term was logged"
    assert math.isfinite(row["train_loss"])
    assert row["train_loss"] == pytest.approx(sum(row[k] for k in terms), rel=1e-5)  # the total is the sum
    assert all(math.isfinite(row[k]) for k in ("val_loss", "val_plcc", "val_mae"))
    assert summary["best_epoch"] == 1
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert [e["name"] for e in saved["enhancers"]] == [name]
    head = load_checkpoint(run / "best.pt").spec.head
    assert head == ("scalar" if ENHANCERS[name].needs_scalar_head else "distribution")
