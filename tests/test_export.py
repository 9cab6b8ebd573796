"""`elta export` as a deployer uses it: exported ONNX and TorchScript models of a calibrated distribution-head
checkpoint and of a scalar-head one score the demo test split as `elta predict` does, carry their metadata,
run again through `elta predict` / `elta.load`, and bad inputs are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import elta
from conftest import tiny_config
from elta.calibration import Calibration, fit_calibration
from elta.cli import main
from elta.data.dataset import ImageListDataset, collate
from elta.data.transforms import ImageTransform
from elta.engine.evaluate import select_split
from elta.engine.prepare import read_dataset
from elta.engine.runtime import Runtime
from elta.engine.trainer import train
from elta.errors import ExportError
from elta.models.checkpoint import load_checkpoint
from elta.models.export_graph import CalibrationMap
from elta.workflows.calibrate import calibrate_checkpoint
from elta.workflows.export import export_checkpoint

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def checkpoints(demo_data, tmp_path_factory):
    """A distribution-head checkpoint with a quantile map, and a scalar-head one (test_convnext, 48 px)."""
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config(demo_data)
    train(cfg, root / "dist")
    calibrate_checkpoint(
        root / "dist" / "best.pt", cfg, Runtime(workers=0), method="quantile", out=root / "calibrated.pt"
    )
    train(tiny_config(demo_data, train={"loss": "mse"}), root / "scalar")
    return {"calibrated": root / "calibrated.pt", "scalar": root / "scalar" / "best.pt"}


@pytest.fixture(scope="module")
def exported(checkpoints, test_split, tmp_path_factory):
    """Both checkpoints exported by `elta export`: the calibrated one for any batch size, the scalar one for
    batch 1 (the default); the parity check ran on four test images."""
    root = tmp_path_factory.mktemp("onnx")
    files = {}
    for kind, extra in (("calibrated", ["--dynamic-batch"]), ("scalar", [])):
        files[kind] = root / f"{kind}.onnx"
        argv = ["export", str(checkpoints[kind]), str(files[kind]), *extra, "--images", *test_split[:4]]
        assert main(argv) == 0
    return files


@pytest.fixture(scope="module")
def test_split(demo_data):
    frame = select_split(read_dataset(tiny_config(demo_data)).frame, "test")
    return frame["path"].astype(str).tolist()


def predict_csv(checkpoint, paths, out, *extra) -> pd.DataFrame:
    listing = out.with_suffix(".txt")
    listing.write_text("\n".join(paths) + "\n")
    argv = ["predict", str(listing), "--checkpoint", str(checkpoint), "--out", str(out), "--workers", "0"]
    assert main([*argv, *extra]) == 0
    frame = pd.read_csv(out)
    return frame.assign(error=frame["error"].fillna(""))


def pixels(spec, paths) -> torch.Tensor:
    """The test images as an exported graph takes them: resized, RGB in [0, 1]."""
    transform = ImageTransform.from_spec(spec, normalize=False)
    dataset = ImageListDataset(paths, transform)
    return collate([dataset[i] for i in range(len(dataset))]).images


def numeric_gap(a: pd.DataFrame, b: pd.DataFrame) -> float:
    assert list(a.columns) == list(b.columns)
    assert (a["path"] == b["path"]).all() and (a["error"] == "").all()
    cols = [c for c in a.columns if c not in ("path", "error")]
    x, y = a[cols].to_numpy(float), b[cols].to_numpy(float)
    assert (np.isnan(x) == np.isnan(y)).all()  # std is NaN for a scalar head, in both
    return float(np.nanmax(np.abs(x - y)))


@pytest.mark.parametrize(
    "method, params",
    [
        ("affine", {"a": 1.7, "b": -2.2}),
        ("quantile", {"x": [4.0, 4.5, 5.0, 6.5], "y": [2.0, 4.0, 5.5, 9.0]}),
        ("isotonic", {"x": [3.0, 5.0, 5.25], "y": [4.0, 6.0, 6.5]}),
    ],
)
def test_baked_calibration_map_equals_the_numpy_one(method, params):
    cal = Calibration(method, params, (1.0, 10.0), n_fit=10)
    # below / at / between / above the knots, and far enough out that the clip to [1, 10] bites
    scores = np.array([-3.0, 1.0, 3.9, 4.0, 4.25, 4.5, 4.99, 5.0, 5.1, 5.25, 6.0, 6.5, 6.6, 8.0, 20.0])
    baked = CalibrationMap(cal)(torch.tensor(scores)).numpy()
    np.testing.assert_allclose(baked, cal.apply(scores), rtol=0, atol=1e-12)
    assert baked.min() == 1.0 and baked.max() == 10.0  # the clip reached both ends


def test_baked_quantile_map_of_a_real_fit_equals_the_numpy_one():
    rng = np.random.default_rng(0)
    pred, gt = rng.normal(5, 0.3, 300), rng.normal(5, 1.4, 300)
    cal = fit_calibration(pred, gt, "quantile", score_range=(1, 10), train_gt=rng.normal(5, 1.5, 900))
    scores = np.concatenate([rng.normal(5, 0.6, 1000), cal.params["x"]])
    baked = CalibrationMap(cal)(torch.tensor(scores, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(baked, cal.apply(np.float32(scores)), rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["calibrated", "scalar"])
def test_onnx_export_scores_the_test_split_like_elta_predict(
    kind, checkpoints, exported, test_split, tmp_path
):
    ckpt, out = checkpoints[kind], exported[kind]
    reference = predict_csv(ckpt, test_split, tmp_path / "torch.csv")
    exported = predict_csv(out, test_split, tmp_path / "onnx.csv")
    assert numeric_gap(exported, reference) <= 1e-4
    assert ("score_uncalibrated" in exported) == (kind == "calibrated")
    assert ("p10" in exported) == (kind == "calibrated")
    # the graph's own outputs, as an app reads them: the calibrated score, without elta
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    spec = load_checkpoint(ckpt).spec
    images = pixels(spec, test_split).numpy()
    outputs = [
        np.concatenate(o) for o in zip(*(session.run(None, {"images": x[None]}) for x in images), strict=True)
    ]
    assert np.abs(outputs[0] - reference["score"].to_numpy()).max() <= 1e-4
    if kind == "calibrated":  # the map moved the score: the comparison above saw the baked map work
        assert np.abs(reference["score"] - reference["score_uncalibrated"]).max() > 0.1
        np.testing.assert_allclose(outputs[1], reference["score_uncalibrated"], atol=1e-4)
    # elta.load takes the file too, with the same columns
    frame = elta.load(out, device="cpu", workers=0).score(test_split)
    assert numeric_gap(frame, reference) <= 1e-4


def test_a_checkpoint_runs_on_onnxruntime_when_asked(checkpoints, exported, test_split, tmp_path):
    ckpt = checkpoints["calibrated"]
    raw = predict_csv(ckpt, test_split, tmp_path / "torch.csv", "--no-calibration")
    in_memory = predict_csv(ckpt, test_split, tmp_path / "mem.csv", "--runtime", "onnx", "--no-calibration")
    assert "score_uncalibrated" not in raw and numeric_gap(in_memory, raw) <= 1e-4
    # an exported file with a baked map still gives the model's own score under --no-calibration
    from_file = predict_csv(exported["calibrated"], test_split, tmp_path / "file.csv", "--no-calibration")
    assert numeric_gap(from_file, raw) <= 1e-4


def test_onnx_metadata_round_trip(checkpoints, exported):
    props = ort.InferenceSession(str(exported["calibrated"])).get_modelmeta().custom_metadata_map
    spec = load_checkpoint(checkpoints["calibrated"]).spec
    assert props["elta_version"] == elta.__version__
    assert props["backbone"] == "test_convnext" and props["input_size"] == "48" and props["resize"] == "56"
    assert json.loads(props["score_range"]) == [1.0, 10.0]
    assert json.loads(props["bin_centers"]) == spec.centers
    assert props["calibration"] == "quantile" and props["dataset"] == "AVA.txt (ava)"
    assert json.loads(props["elta"])["spec"] == spec.to_dict()
    assert json.loads(props["elta"])["dataset"] == "AVA.txt (ava)"
    assert ort.InferenceSession(str(exported["calibrated"])).get_inputs()[0].shape == ["batch", 3, 48, 48]
    # without --dynamic-batch: batch 1, which elta predict feeds image by image
    assert ort.InferenceSession(str(exported["scalar"])).get_inputs()[0].shape == [1, 3, 48, 48]


def test_export_without_calibration_gives_the_raw_score(checkpoints, test_split, tmp_path):
    out = tmp_path / "raw.onnx"
    assert main(["export", str(checkpoints["calibrated"]), str(out), "--no-calibration"]) == 0
    session = ort.InferenceSession(str(out))
    assert [o.name for o in session.get_outputs()] == ["score", "probabilities"]
    assert json.loads(session.get_modelmeta().custom_metadata_map["elta"])["spec"]["calibration"] is None
    raw = predict_csv(checkpoints["calibrated"], test_split[:8], tmp_path / "t.csv")
    exported = predict_csv(out, test_split[:8], tmp_path / "o.csv")
    np.testing.assert_allclose(exported["score"], raw["score_uncalibrated"], atol=1e-4)


@pytest.mark.parametrize("kind", ["calibrated", "scalar"])
def test_torchscript_export_scores_like_elta_predict(kind, checkpoints, test_split, tmp_path):
    out = tmp_path / "model.ts"
    code = main(["export", str(checkpoints[kind]), str(out), "--format", "torchscript"])
    assert code == 0
    extra = {"elta.json": ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra["elta.json"])
    assert meta["spec"]["backbone"] == "test_convnext" and meta["exporter"] == "torch.jit.trace"
    reference = predict_csv(checkpoints[kind], test_split, tmp_path / "torch.csv")
    with torch.no_grad():
        outputs = module(pixels(load_checkpoint(checkpoints[kind]).spec, test_split))
    assert np.abs(outputs[0].numpy() - reference["score"].to_numpy()).max() <= 1e-4
    if kind == "calibrated":
        dist = reference[[f"p{k}" for k in range(1, 11)]].to_numpy()
        assert np.abs(outputs[2].numpy() - dist).max() <= 1e-4


def test_an_export_that_does_not_reproduce_pytorch_is_refused(checkpoints, tmp_path):
    out = tmp_path / "model.ts"
    result = export_checkpoint(checkpoints["calibrated"], out, format="torchscript")
    assert result.checked_on == "4 random inputs" and max(result.deviation.values()) <= 1e-4
    out.unlink()
    with pytest.raises(ExportError, match="not written: the exported model's .* differs from PyTorch"):
        export_checkpoint(checkpoints["calibrated"], out, format="torchscript", tolerance=-1.0)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["static", "dynamic"])
def test_int8_export_is_scored_and_its_deviation_reported(
    method, checkpoints, demo_data, test_split, tmp_path
):
    out = tmp_path / "int8.onnx"
    result = export_checkpoint(
        checkpoints["calibrated"], out, quantize="int8", quantize_method=method, quantize_count=40,
        dynamic_batch=True, images=test_split[:8],
    )  # fmt: skip
    assert result.quantized == f"int8 {method}" and np.isfinite(result.deviation["score"])
    props = ort.InferenceSession(str(out)).get_modelmeta().custom_metadata_map
    assert json.loads(props["elta"])["quantized"] == f"int8 {method}" and props["calibration"] == "quantile"
    frame = predict_csv(out, test_split, tmp_path / "int8.csv")
    reference = predict_csv(checkpoints["calibrated"], test_split, tmp_path / "torch.csv")
    assert list(frame.columns) == list(reference.columns) and (frame["error"] == "").all()
    assert np.corrcoef(frame["score_uncalibrated"], reference["score_uncalibrated"])[0, 1] > 0.9
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_bad_inputs_are_one_line_errors(checkpoints, tmp_path, capsys):
    import onnx

    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    plain = tmp_path / "plain.onnx"  # a valid ONNX model, not exported by elta
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["images"], ["score"])],
        "plain",
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), plain)
    photo = tmp_path / "photo.jpg"
    cases = [
        (["export", str(not_a_checkpoint), str(tmp_path / "a.onnx")], "cannot be read as a checkpoint"),
        (["export", str(checkpoints["scalar"]), str(tmp_path / "b.x"), "--format", "tflite"], "--format must be"),
        (["export", str(checkpoints["scalar"]), str(tmp_path / "c.pt"), "--format", "torchscript",
          "--quantize", "int8"], "export with --format onnx"),
        (["predict", str(photo), "--checkpoint", str(plain)], "without elta's metadata"),
        (["predict", str(photo), "--checkpoint", str(plain), "--runtime", "torch"], "runs on onnxruntime"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.pt", "plain.onnx"]
