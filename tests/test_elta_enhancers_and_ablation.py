"""Enhancers in training: the interface, TFA/FLSA in a real run, regressor retraining, the ablation table."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch
import yaml

from conftest import tiny_config, tiny_train_args
from elta.cli import main
from elta.config import RunConfig
from elta.engine.trainer import train
from elta.enhancers import StepState, build_enhancers, parse_enhancer
from elta.functional import flsa_loss
from elta.models.checkpoint import load_checkpoint
from elta.workflows.ablate import COLUMNS, apds_settings, parse_variant, run_ablation, summarise


def step_state(n=6, k=4):
    g = torch.Generator().manual_seed(0)
    dist = torch.rand(n, k, generator=g)
    return StepState(
        features=torch.randn(n, 8, generator=g),
        targets=dist / dist.sum(1, keepdim=True),
        scores=torch.tensor([1.0, 2.0, 2.5, 3.0, 3.5, 9.0])[:n],
        weights=torch.ones(n),
        score_range=(1.0, 10.0),
    )


def test_registry_builds_in_order_and_rejects_typos():
    built = build_enhancers([{"name": "flsa", "weight": 0.1}, {"name": "tfa", "tau2": 10}])
    assert [e.name for e in built] == ["tfa", "flsa"]  # augmentation first, so FLSA covers mixed rows
    with pytest.raises(ValueError, match="unknown enhancer 'tfb'"):
        build_enhancers([{"name": "tfb"}])
    with pytest.raises(ValueError, match="unknown setting.*tau3"):
        build_enhancers([{"name": "tfa", "tau3": 1}])
    with pytest.raises(ValueError, match="tau1 and tau2 must be > 0"):
        build_enhancers([{"name": "tfa", "tau1": 0}])
    assert parse_enhancer("tfa:tau1=0.3,pairs=2") == {"name": "tfa", "tau1": 0.3, "pairs": 2}
    assert parse_variant("tfa:tau1=0.3+flsa:weight=0.1") == [
        {"name": "tfa", "tau1": 0.3},
        {"name": "flsa", "weight": 0.1},
    ]
    assert parse_variant("baseline") == []
    assert parse_variant("tfa+apds:threshold=0.5,beta=1.2") == [{"name": "tfa"}]
    assert apds_settings("tfa+apds:thresholds=0.3;0.4,min_selected=5") == {
        "thresholds": [0.3, 0.4],
        "min_selected": 5,
    }
    assert apds_settings("tfa+flsa") is None
    with pytest.raises(ValueError, match="unknown apds setting"):
        apds_settings("apds:gamma=1")


def test_tfa_appends_mixed_rows_and_flsa_covers_them():
    tfa, flsa = build_enhancers([{"name": "tfa", "pairs": 2}, {"name": "flsa", "weight": 2.0}])
    state = step_state()
    torch.manual_seed(0)
    state = tfa(state)
    assert state.features.shape == (8, 8) and state.targets.shape == (8, 4) and state.scores.shape == (8,)
    assert torch.allclose(state.targets.sum(1), torch.ones(8))
    assert state.weights.shape == (8,) and torch.allclose(state.weights, torch.ones(8))
    state = flsa(state)
    expected = 2.0 * flsa_loss(state.features, state.scores)
    assert torch.allclose(state.losses["flsa"], expected)
    dataset_range = build_enhancers([{"name": "flsa", "range": "dataset"}])[0](step_state())
    assert torch.allclose(
        dataset_range.losses["flsa"], flsa_loss(step_state().features, step_state().scores, 9.0)
    )


def test_training_with_tfa_and_flsa_logs_each_loss_term(demo_data, tmp_path):
    code = main(
        [
            *tiny_train_args(demo_data, tmp_path / "run"),
            "--tfa",
            "--tfa-tau2",
            "10",
            "--flsa-weight",
            "0.5",
        ]
    )
    assert code == 0
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert {"train_loss", "train_main", "train_flsa"} <= set(metrics.columns)
    row = metrics.iloc[0]
    assert row["train_loss"] == pytest.approx(row["train_main"] + row["train_flsa"], rel=1e-5)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["enhancers"] == [{"name": "tfa", "tau2": 10.0}, {"name": "flsa", "weight": 0.5}]
    assert RunConfig.from_yaml(tmp_path / "run" / "config.yaml").enhancers == saved["enhancers"]


def test_regressor_retraining_on_cached_features(demo_data, tmp_path):
    teacher = tmp_path / "stage1"
    train(
        tiny_config(demo_data).override("model", backbone="test_resnet"), teacher
    )  # not the config's backbone
    model = {
        "init_from": str(teacher / "best.pt"),
        "freeze_backbone": True,
        "reset_head": True,
        "neck_dim": 16,
    }
    cfg = tiny_config(demo_data, model=model)
    cfg = dataclasses.replace(cfg, enhancers=[{"name": "flsa", "weight": 1.0}])
    cfg = cfg.override("train", cache_features=True, epochs=2)
    train(cfg, tmp_path / "rrt")
    cache = tmp_path / "rrt" / "feature_cache.pt"
    assert cache.is_file()
    before, after = (
        load_checkpoint(teacher / "best.pt").weights,
        load_checkpoint(tmp_path / "rrt" / "last.pt").weights,
    )
    backbone_keys = [k for k in before if k.startswith("backbone.")]
    assert all(torch.equal(before[k], after[k]) for k in backbone_keys), "the frozen backbone changed"
    assert "neck.0.weight" in after and not torch.equal(before["head.2.weight"], after["head.2.weight"])
    log = (tmp_path / "rrt" / "train.log").read_text()
    assert log.count("computing backbone features") == 2  # train and val, once
    # The cached features are those of the eval transform: the same as a forward of the backbone.
    stored = torch.load(cache, weights_only=True)
    train_entry = next(e for e in stored.values() if e["split"] == "train")
    assert train_entry["features"].shape[1] == 96  # test_resnet's width: the starting checkpoint's backbone
    # Resuming the finished run rebuilds the same architecture and reuses the cache.
    train(cfg, tmp_path / "rrt", resume=True)
    assert (tmp_path / "rrt" / "train.log").read_text().count("computing backbone features") == 2

    with pytest.raises(ValueError, match="cache_features needs model.freeze_backbone"):
        cfg.override("model", freeze_backbone=False)
    with pytest.raises(ValueError, match="--reset-head"):
        train(
            tiny_config(demo_data, model={"init_from": str(teacher / "best.pt"), "neck_dim": 16}),
            tmp_path / "bad",
        )


def test_shared_feature_cache_follows_the_backbone_weights_not_the_checkpoint_path(demo_data, tmp_path):
    import shutil

    for seed in (0, 1):  # two starting checkpoints with different backbone weights
        train(tiny_config(demo_data, train={"seed": seed}), tmp_path / f"teacher{seed}")
    checkpoint, shared = tmp_path / "start.pt", tmp_path / "shared_cache.pt"
    model = {"init_from": str(checkpoint), "freeze_backbone": True, "reset_head": True, "neck_dim": 16}
    cfg = tiny_config(demo_data, model=model, train={"cache_features": True, "feature_cache": str(shared)})

    def computed(run: str) -> int:
        train(cfg, tmp_path / run)
        return (tmp_path / run / "train.log").read_text().count("computing backbone features")

    shutil.copy(tmp_path / "teacher0" / "best.pt", checkpoint)
    assert computed("first") == 2  # train and val
    assert computed("same_weights") == 0  # another run from the same checkpoint reuses them
    shutil.copy(tmp_path / "teacher1" / "best.pt", checkpoint)  # retrained, at the same path
    assert computed("retrained") == 2
    assert len(torch.load(shared, weights_only=True)) == 4


def test_ablation_table_over_variants_and_seeds(demo_data, tmp_path):
    base = tiny_config(demo_data, model={"freeze_backbone": True}).override(
        "train", cache_features=True, epochs=2, lr=3e-3
    )
    table = run_ablation(base, ["baseline", "tfa", "tfa+flsa"], seeds=2, out=tmp_path / "abl")
    assert len(table) == 6 and set(table["variant"]) == {"baseline", "tfa", "tfa+flsa"}
    assert table[["srcc", "mae_low", "bias_low", "spread"]].notna().all().all()
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "| tfa+flsa |" in md and "Δsrcc" in md and "**" in md and " ± " in md
    csv = pd.read_csv(tmp_path / "abl" / "ablation.csv")
    assert list(csv.columns[:3]) == ["variant", "seed", "plcc"]
    tails = (csv["mae_low"] + csv["mae_high"]).to_numpy() / 2
    assert csv["mae_tail"].to_numpy() == pytest.approx(tails, rel=1e-5)  # the CSV keeps 6 digits
    assert "Δmae_tail" in md
    # Running it again reuses every finished run and gives the same table.
    again = run_ablation(base, ["baseline", "tfa", "tfa+flsa"], seeds=2, out=tmp_path / "abl")
    pd.testing.assert_frame_equal(table, again)
    assert (tmp_path / "abl" / "feature_cache.pt").is_file()


def test_ablation_table_bolds_the_best_cell_by_each_columns_rule():
    # spreads on both sides of one: 1.30 is the largest, 0.95 the closest to one
    values = {
        "baseline": {"plcc": 0.90, "mae": 0.20, "bias_low": 0.10, "bias_high": -0.30, "spread": 1.30},
        "a": {"plcc": 0.95, "mae": 0.25, "bias_low": -0.05, "bias_high": 0.20, "spread": 0.95},
        "b": {"plcc": 0.85, "mae": 0.15, "bias_low": 0.20, "bias_high": -0.10, "spread": 0.80},
    }
    rows = [{"variant": v, "seed": 0, **{k: 0.5 for k, _ in COLUMNS}, **m} for v, m in values.items()]
    md = summarise(pd.DataFrame(rows), list(values), "test")
    header = next(line for line in md.splitlines() if line.startswith("| variant | plcc"))
    names = [c.strip() for c in header.strip("|").split("|")]
    bold = set()
    for line in md.splitlines()[: md.splitlines().index(header) + 5]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in values:
            bold.update({(cells[0], names[i]) for i, c in enumerate(cells) if c.startswith("**")})
    assert {col for _, col in bold} == {k for k, _ in COLUMNS}  # one bold cell per column (ties: the first)
    assert ("a", "spread") in bold and ("baseline", "spread") not in bold
    assert ("a", "plcc") in bold and ("b", "mae") in bold
    assert ("a", "bias_low") in bold and ("b", "bias_high") in bold


def test_ablation_apds_variant_self_trains_on_unlabelled_images(demo_data, tmp_path):
    from elta.data.demo import make_demo_dataset

    pool = tmp_path / "pool"
    make_demo_dataset(pool, n=40, seed=11, image_size=64)
    base = tiny_config(demo_data)
    with pytest.raises(ValueError, match="--unlabeled"):
        run_ablation(base, ["baseline", "apds"], seeds=1, out=tmp_path / "no-pool")
    variant = "apds:beta=1.25,threshold=0.2"
    table = run_ablation(
        base, ["baseline", variant], seeds=1, out=tmp_path / "abl", unlabeled=[str(pool / "images")]
    )
    assert list(table["variant"]) == ["baseline", variant]
    stage = tmp_path / "abl" / "runs" / "apds_beta=1.25_threshold=0.2" / "seed0"
    assert (stage / "round1" / "student" / "eval" / "metrics.json").is_file()
    pseudo = json.loads((stage / "round1" / "pseudo.json").read_text())
    assert (pseudo["beta"], pseudo["threshold"]) == (1.25, 0.2)


def test_variant_tokens_for_calibration_and_scalar_heads():
    from elta.workflows.ablate import calibration_settings, training_variant, variant_loss

    assert variant_loss("bmc", "auto") == "mse" and variant_loss("scalar+lds", "emd") == "mse"
    assert variant_loss("tfa+flsa", "auto") == "auto" and variant_loss("bmc", "l1") == "l1"
    assert training_variant("baseline+calibration:method=quantile") == "baseline"
    assert training_variant("tfa+calibration") == "tfa"
    assert calibration_settings("tfa+calibration") == {"method": "affine"}
    assert calibration_settings("calibration:method=isotonic") == {"method": "isotonic"}
    with pytest.raises(ValueError, match="calibration takes method"):
        calibration_settings("calibration:method=spline")


def test_ablation_calibration_variant_reuses_the_runs_and_keeps_srcc(demo_data, tmp_path):
    base = tiny_config(demo_data, model={"freeze_backbone": True}).override(
        "train", cache_features=True, epochs=2, lr=3e-3
    )
    table = run_ablation(base, ["baseline", "baseline+calibration"], seeds=1, out=tmp_path / "abl")
    assert not (tmp_path / "abl" / "runs" / "baseline+calibration").exists()  # same training run
    plain, calibrated = table.iloc[0], table.iloc[1]
    assert calibrated["srcc"] == pytest.approx(plain["srcc"], abs=1e-12)  # a monotone map keeps the ranking
    assert calibrated["spread"] != pytest.approx(plain["spread"])
    assert (
        tmp_path / "abl" / "runs" / "baseline" / "seed0" / "eval_calibration_affine" / "metrics.json"
    ).is_file()
