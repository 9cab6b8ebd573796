"""Ray Data scoring (local Ray, 2 actors) writes the rows an in-process run writes, bad inputs included."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_config
from elta.cli import main
from elta.engine.trainer import train
from elta.workflows.collection import read_frames

pytest.importorskip("ray.data")


def test_ray_with_two_actors_equals_the_in_process_run(demo_data, tmp_path):
    import ray

    run = tmp_path / "run"
    train(tiny_config(demo_data), run)
    photos = tmp_path / "photos"
    shutil.copytree(demo_data / "images", photos)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    listed = tmp_path / "list.txt"
    listed.write_text(f"{photos}\n{photos / '3.jpg'}\n")  # 3.jpg a second time: a duplicate key

    common = ["--checkpoint", str(run), "--device", "cpu", "--workers", "0", "--batch-size", "16"]
    local = tmp_path / "local.parquet"
    assert main(["predict", str(listed), "--out", str(local), *common]) == 0
    on_ray = tmp_path / "ray.parquet"
    try:
        assert (
            main(["predict", str(listed), "--out", str(on_ray), "--engine", "ray", "--actors", "2", *common])
            == 0
        )
    finally:
        ray.shutdown()
    a = pd.concat(list(read_frames(local)), ignore_index=True)
    b = pd.concat(list(read_frames(on_ray)), ignore_index=True)
    assert len(a) == 92 and a["path"].tolist() == b["path"].tolist()
    assert a["error"].tolist() == b["error"].tolist()
    assert (a["error"] != "").sum() == 2 and "duplicate key" in a["error"].iloc[-1]
    # the actors' float32 sums may run on other thread counts: a few ulps (≈ 5e-7 at a score of 5) apart
    for column in [c for c in a.columns if c not in ("path", "error")]:
        np.testing.assert_allclose(b[column], a[column], rtol=0, atol=1e-5, err_msg=column)
    assert not (tmp_path / "ray.parquet.ray").exists()
