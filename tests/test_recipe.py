"""Training recipes: the defaults by backbone family, the head's learning rate, layer decay and weight EMA."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import reference_and_resumed, tiny_config
from elta.config import RECIPES, RunConfig
from elta.engine.trainer import setup, train, update_ema
from elta.errors import ConfigError
from elta.models.checkpoint import load_checkpoint


def test_unset_settings_come_from_the_recipe_of_the_backbone_family():
    paper = RunConfig().resolved().train  # the paper's backbone, SwinV2-B
    assert (paper.recipe, paper.lr, paper.optimizer, paper.schedule, paper.ema) == (
        "paper",
        1e-5,
        "adam",
        "constant",
        0.0,
    )
    lite0 = RunConfig.from_dict({"model": {"backbone": "tf_efficientnet_lite0"}, "train": {"lr": "3e-4"}})
    fine = lite0.resolved().train
    assert fine.recipe == "finetune" and fine.lr == 3e-4  # what the user gave wins
    assert {k: getattr(fine, k) for k in RECIPES["finetune"] if k != "lr"} == {
        k: v for k, v in RECIPES["finetune"].items() if k != "lr"
    }
    forced = RunConfig.from_dict(
        {"model": {"backbone": "tf_efficientnet_lite0"}, "train": {"recipe": "paper"}}
    )
    assert forced.resolved().train.lr == 1e-5
    assert (
        RunConfig.from_dict({"model": {"backbone": "vit_base_patch16_224"}}).resolved().train.recipe
        == "paper"
    )


@pytest.mark.parametrize(
    ("train", "named"), [({"ema": 1.0}, "train.ema"), ({"layer_decay": 1.5}, "train.layer_decay"),
                         ({"backbone_lr_scale": 0}, "train.backbone_lr_scale"), ({"recipe": "fast"}, "train.recipe")]
)  # fmt: skip
def test_bad_recipe_settings_are_one_line_errors_naming_the_setting(train, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        RunConfig.from_dict({"train": train})


def test_a_run_config_saved_before_recipes_resumes_with_the_settings_it_was_run_with():
    old = {"model": {"backbone": "tf_efficientnet_lite0"}, "train": {"lr": 1e-3, "optimizer": "adamw", "weight_decay": 0,
           "schedule": "cosine", "warmup_epochs": 0.5, "grad_clip": 5.0}}  # fmt: skip
    train = RunConfig.from_dict(old).resolved().train
    assert (train.backbone_lr_scale, train.layer_decay, train.ema) == (1.0, 1.0, 0.0)
    assert (train.lr, train.optimizer, train.schedule) == (1e-3, "adamw", "cosine")


def test_print_config_shows_the_values_the_run_will_use(demo_data):
    args = [
        "train",
        "--data",
        str(demo_data / "AVA.txt"),
        "--backbone",
        "tf_efficientnet_lite0",
        "--print-config",
    ]
    out = subprocess.run([sys.executable, "-m", "elta", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "recipe: finetune" in text and "optimizer: adamw" in text and "schedule: cosine" in text


def test_head_learns_at_its_own_rate_and_layer_decay_slows_the_early_layers(demo_data, tmp_path):
    state = setup(tiny_config(demo_data, train={"lr": 1e-3, "backbone_lr_scale": 0.1}), tmp_path / "a")
    rates = [g["initial_lr"] for g in state.optimizer.param_groups]
    assert rates == [pytest.approx(1e-4), pytest.approx(1e-3)]  # backbone, then neck + head
    head = set(map(id, state.model.head.parameters()))
    assert head == set(map(id, state.optimizer.param_groups[1]["params"]))

    decayed = tiny_config(demo_data, model={"backbone": "test_vit"}, train={"lr": 1e-3, "layer_decay": 0.5})
    rates = [g["initial_lr"] for g in setup(decayed, tmp_path / "b").optimizer.param_groups]
    backbone = rates[:-1]
    assert max(backbone) == pytest.approx(1e-3) and min(backbone) < 1e-3 / 2  # the embedding, layers below
    assert rates[-1] == pytest.approx(1e-3)  # the head, at lr


def test_ema_moves_towards_the_weights_by_the_hand_computed_factor():
    ema, model = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    for module, value in ((ema, 0.0), (model, 1.0)):
        nn.init.constant_(module.weight, value)
        module.num_batches_tracked.fill_(int(value * 7))
    update_ema(ema, model, decay=0.9, steps=100)  # decay min(0.9, 101 / 110) = 0.9
    assert torch.allclose(ema.weight, torch.full((2,), 0.1))
    assert int(ema.num_batches_tracked) == 7  # integer buffers are copied
    update_ema(ema, model, decay=0.9, steps=0)  # the first steps: min(0.9, 1 / 10) = 0.1
    assert torch.allclose(ema.weight, torch.full((2,), 0.1 + 0.9 * 0.9))


def test_ema_run_keeps_the_average_in_best_pt_and_resumes_exactly(demo_data, tmp_path):
    reference, resumed = reference_and_resumed(tiny_config(demo_data, epochs=2, train={"ema": 0.5}), tmp_path)
    for key, value in reference.training["raw_weights"].items():
        assert torch.equal(value, resumed.training["raw_weights"][key]), key
    for key, value in reference.weights.items():  # the average
        assert torch.equal(value, resumed.weights[key]), key


def test_checkpoints_hold_the_average_that_validation_scored(demo_data, tmp_path):
    train(tiny_config(demo_data, epochs=1, train={"ema": 0.5}), tmp_path / "run")
    last, best = (load_checkpoint(tmp_path / "run" / name) for name in ("last.pt", "best.pt"))
    assert "raw_weights" not in best.training and best.training["epoch"] == 1
    assert all(torch.equal(best.weights[k], v) for k, v in last.weights.items())
    raw = last.training["raw_weights"]  # the last step's weights, kept for a resume
    assert not all(torch.equal(best.weights[k], v) for k, v in raw.items())
