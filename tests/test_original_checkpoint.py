"""Checkpoints of the original ELTA code load safely and score exactly as the original model does.

The fixtures come from ``tests/fixtures/original/make_fixture.py``, run with timm 0.6.12 (the original's
version): a small SwinV2 inside the original model class, its outputs on a fixed batch, and the state-dict
keys of the original model with the paper's ``swinv2_base_window8_256``.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms as T
from PIL import Image

from elta.data.transforms import ImageTransform
from elta.errors import CheckpointError
from elta.models import build_model
from elta.models.checkpoint import (
    Checkpoint,
    import_original_checkpoint,
    load_checkpoint,
    original_checkpoint,
    read_original_checkpoint,
    save_checkpoint,
)
from elta.models.model import AestheticModel
from elta.models.original import convert_original_state_dict, is_original_checkpoint, original_head

FIXTURES = Path(__file__).parent / "fixtures" / "original"
TINY_CKPT = FIXTURES / "elta_tiny_swinv2.pth"
# make_fixture.TINY_SWINV2 in current timm, without the classifier
TINY_SWINV2 = dict(
    img_size=64, window_size=4, embed_dim=8, depths=(2, 2, 2), num_heads=(1, 2, 4), num_classes=0
)


def tiny_swinv2() -> torch.nn.Module:
    return timm.create_model("swinv2_tiny_window8_256", pretrained=False, **TINY_SWINV2)


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "expected.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny_original() -> dict:
    return read_original_checkpoint(TINY_CKPT)


def run_converted(payload: Checkpoint, images: torch.Tensor):
    model = AestheticModel(tiny_swinv2(), payload.spec)
    model.load_state_dict(payload.weights)
    with torch.no_grad():
        return model.eval()(images)


def base_original_state() -> dict[str, torch.Tensor]:
    """Original-style weights of the paper's model (keys and shapes from timm 0.6.12), every entry 0.

    ``expand`` keeps each tensor one element in memory and on disk.
    """
    state = {}
    for line in (FIXTURES / "swinv2_base_0612_keys.txt").read_text().splitlines():
        key, shape = line.split("\t")
        state[key] = torch.zeros(1).expand(*[int(d) for d in shape.split(",")])
    return state


def adam_state_for(state: dict, trained: str) -> dict:
    """An optimizer entry as the original's Adam writes it: state only for the parameters that trained."""
    n = sum(1 for k in state if not k.endswith("attn_mask"))
    ids = list(range(n))
    trained_ids = ids[-6:-2] if trained == "emd" else ids[-2:]
    return {
        "state": {i: {"step": 10, "exp_avg": torch.zeros(1)} for i in trained_ids},
        "param_groups": [{"lr": 1e-5, "params": ids}],
    }


# --- same scores as the original model -------------------------------------------------------------------


def test_the_fixture_needs_more_than_plain_weights_only():
    # best_metric is a numpy float (as scipy's SRCC), which plain weights_only loading refuses
    with pytest.raises(pickle.UnpicklingError):
        torch.load(TINY_CKPT, weights_only=True)


def test_reads_the_original_checkpoint_as_saved(tiny_original):
    assert tiny_original["epoch"] == 3
    assert isinstance(tiny_original["best_metric"], np.floating)
    assert tiny_original["best_metric"] == pytest.approx(0.7431)
    assert is_original_checkpoint(tiny_original)
    assert original_head(tiny_original) == "distribution"  # the fixture trained the EMD head


def test_distribution_head_scores_like_the_original(tiny_original, expected):
    payload = original_checkpoint(tiny_original, backbone=tiny_swinv2())
    assert payload.spec.head == "distribution"
    out = run_converted(payload, expected["input"])
    torch.testing.assert_close(out.features, expected["features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, expected["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.distribution, expected["distribution"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.score, expected["mos"], atol=1e-5, rtol=0)


def test_scalar_head_scores_like_the_original(tiny_original, expected):
    # the original's mse mode: sigmoid(linear_mse(f)), trained on MOS / 10 and multiplied by 10
    payload = original_checkpoint(tiny_original, head="scalar", backbone=tiny_swinv2())
    assert payload.spec.score_range == [0.0, 10.0]
    out = run_converted(payload, expected["input"])
    torch.testing.assert_close(out.score_unit, expected["scalar_unit"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.score, expected["scalar_mos"], atol=1e-5, rtol=0)


def test_a_wrong_patch_merging_order_would_be_caught(tiny_original, expected):
    # control: swapping the 2x2 gather order of one patch merging moves the scores far beyond the tolerance
    payload = original_checkpoint(tiny_original, backbone=tiny_swinv2())
    key = "backbone.layers.1.downsample.reduction.weight"
    weight = payload.weights[key].clone()
    c = weight.shape[1] // 4
    payload.weights[key] = torch.cat(
        [weight[:, :c], weight[:, 2 * c : 3 * c], weight[:, c : 2 * c], weight[:, 3 * c :]], 1
    )
    out = run_converted(payload, expected["input"])
    assert (out.score - expected["mos"]).abs().max() > 1e-2


def test_spec_follows_the_original_pipeline(tiny_original):
    spec = original_checkpoint(tiny_original, backbone=tiny_swinv2()).spec
    assert spec.centers == [float(c) for c in range(1, 11)]
    assert spec.score_range == [1.0, 10.0]
    assert spec.acc_threshold == 5.0
    assert (spec.image_size, spec.resize) == (256, 300)
    assert spec.mean == pytest.approx([0.485, 0.456, 0.406])
    assert spec.std == pytest.approx([0.229, 0.224, 0.225])


def test_eval_transform_matches_the_original_one(tiny_original):
    # the original's eval transform (dataset.py): Resize((256, 256)), ToTensor, ImageNet Normalize
    original = T.Compose(
        [T.Resize((256, 256)), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    )
    spec = original_checkpoint(tiny_original, backbone=tiny_swinv2()).spec
    pixels = np.random.default_rng(0).integers(0, 256, size=(183, 311, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    torch.testing.assert_close(ImageTransform.from_spec(spec)(image), original(image), atol=1e-6, rtol=0)


# --- the paper's backbone: every key of timm 0.6.12 maps onto current timm ------------------------------


def test_every_swinv2_base_key_maps_with_its_shape():
    state = base_original_state()
    converted = convert_original_state_dict(state)  # raises on any missing, unexpected or misshapen key
    dropped = {k for k in state if k.startswith("vit.head.") or k.endswith(".attn_mask")}
    dropped |= {k for k in state if k.startswith("linear_mse.")}
    assert len(converted) == len(state) - len(dropped)
    assert {k for k in dropped if k.endswith(".attn_mask")}  # persistent in timm 0.6.12, recomputed now
    assert converted["backbone.layers.1.downsample.reduction.weight"].shape == (256, 512)
    assert converted["backbone.layers.3.downsample.reduction.weight"].shape == (1024, 2048)
    assert "backbone.layers.0.downsample.reduction.weight" not in converted
    with torch.device("meta"):
        target = build_model("swinv2_base_window8_256", "distribution", list(range(1, 11)), [1, 10])
    assert set(converted) == set(target.state_dict())
    scalar = convert_original_state_dict(state, head="scalar")
    assert {k for k in scalar if k.startswith("head.")} == {"head.1.weight", "head.1.bias"}


def test_imported_base_checkpoint_rebuilds_and_scores(tmp_path):
    state = base_original_state()
    source = tmp_path / "ckpt.pth"
    torch.save(
        {
            "epoch": 12,
            "state_dict": state,
            "optimizer": adam_state_for(state, "mse"),
            "best_metric": np.float64(0.76),
        },
        source,
    )
    written = import_original_checkpoint(source, tmp_path / "elta.pt")
    payload = load_checkpoint(written)
    assert payload.spec.backbone == "swinv2_base_window8_256"
    assert payload.spec.head == "scalar"  # found from the optimizer state
    assert payload.imported_from == {
        "format": "elta-original",
        "path": str(source),
        "epoch": 12,
        "best_metric": 0.76,
    }
    model = payload.build_model()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 256, 256))
    torch.testing.assert_close(out.score, torch.tensor([5.0]))  # all-zero weights: 10 * sigmoid(0)


def test_import_checkpoint_command_writes_a_checkpoint_that_predict_reads(tmp_path, capsys):
    from elta.cli import main

    state = base_original_state()
    source = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state, "optimizer": adam_state_for(state, "emd")}, source)
    assert main(["import-checkpoint", str(source), str(tmp_path / "elta.pt")]) == 0
    assert "wrote" in capsys.readouterr().out
    converted = load_checkpoint(tmp_path / "elta.pt")
    assert converted.spec.head == "distribution" and converted.imported_from["path"] == str(source)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((300, 300, 3), dtype=np.uint8)).save(photo)
    assert main(["predict", "--checkpoint", str(tmp_path / "elta.pt"), str(photo), "--device", "cpu"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split(",")
    assert float(row[1]) == pytest.approx(5.5)  # all-zero weights: a uniform distribution over 1..10


def test_load_checkpoint_converts_original_ones_in_memory(tmp_path, caplog):
    state = base_original_state()
    source = tmp_path / "bare_state_dict.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, source)  # DataParallel prefix, no optimizer
    with caplog.at_level(logging.WARNING, logger="elta.models.original"):
        payload = load_checkpoint(source)
    assert "cannot tell which head" in caplog.text
    assert payload.spec.head == "distribution"
    assert payload.path == str(source)
    assert sorted(tmp_path.iterdir()) == [source]  # nothing written


def test_load_checkpoint_reads_elta_checkpoints_and_run_folders(tmp_path):
    model = build_model("test_resnet", "distribution", [1.0, 2.0, 3.0], [1.0, 3.0], image_size=64)
    path = save_checkpoint(tmp_path / "best.pt", model, training={"epoch": 2})
    payload = load_checkpoint(path)
    assert payload.training["epoch"] == 2 and payload.path == str(path)
    assert load_checkpoint(tmp_path).path == str(path)  # a run folder


# --- safety and clear errors ------------------------------------------------------------------------------


def _touch(path: str) -> None:
    Path(path).write_text("unpickled")


class Payload:
    """An object whose unpickling would run code (creates a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return _touch, (str(self.marker),)


def test_refuses_a_pickle_with_an_arbitrary_object(tmp_path, tiny_original):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny_original["state_dict"], "best_metric": Payload(marker)}, path)
    for read in (
        read_original_checkpoint,
        load_checkpoint,
        lambda p: import_original_checkpoint(p, tmp_path / "x.pt"),
    ):
        with pytest.raises(CheckpointError, match=r"evil\.pth: holds a Python object .*_touch"):
            read(path)
    assert not marker.exists()


def test_numpy_2_scalars_load_too(tmp_path, tiny_original):
    path = tmp_path / "np2.pth"
    metric = {"srcc": np.float64(0.7), "plcc": np.float32(0.6), "n": np.int64(5), "ok": np.bool_(True)}
    torch.save({"state_dict": tiny_original["state_dict"], "best_metric": metric}, path)
    assert read_original_checkpoint(path)["best_metric"]["n"] == 5


def test_a_file_that_is_not_an_original_checkpoint(tmp_path):
    other = tmp_path / "weights.pth"
    torch.save({"state_dict": {"conv.weight": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match=r"weights\.pth: not an original ELTA checkpoint"):
        read_original_checkpoint(other)
    with pytest.raises(CheckpointError, match=r"weights\.pth: neither an elta checkpoint .* nor an original"):
        load_checkpoint(other)
    garbage = tmp_path / "notes.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.pth: cannot be read as a checkpoint"):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match=r"missing\.pth: no such checkpoint file"):
        import_original_checkpoint(tmp_path / "missing.pth", tmp_path / "out.pt")


def test_a_backbone_that_does_not_fit_is_named(tiny_original):
    with pytest.raises(ValueError, match="do not fit swinv2_base_window8_256 .*missing"):
        convert_original_state_dict(tiny_original["state_dict"])
    with pytest.raises(ValueError, match="only swinv2_\\* backbones"):
        convert_original_state_dict(tiny_original["state_dict"], backbone="resnet50")


def test_head_is_read_from_the_optimizer_state(tiny_original):
    state = tiny_original["state_dict"]
    assert original_head({"state_dict": state, "optimizer": adam_state_for(state, "mse")}) == "scalar"
    assert original_head({"state_dict": state, "optimizer": adam_state_for(state, "emd")}) == "distribution"
    assert original_head({"state_dict": state}) is None
