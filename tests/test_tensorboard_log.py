"""--log-to tensorboard: the per-epoch scalars of metrics.csv as TensorBoard events, for watching a run live."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import tiny_config
from elta.engine.trainer import train


def test_tensorboard_events_hold_the_metrics_csv_scalars(demo_data, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    train(tiny_config(demo_data, epochs=2, train={"log_to": "tensorboard"}), run)
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    table = pd.read_csv(run / "metrics.csv")
    for key in ("train_loss", "val_loss", "val_srcc", "val_mae", "lr"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [1, 2]
        assert [e.value for e in logged] == pytest.approx(table[key].tolist(), rel=1e-6)
