"""``elta export``: a checkpoint as an ONNX or TorchScript file that runs without elta.

The exported graph (:class:`~elta.models.export_graph.ExportGraph`) takes RGB in [0, 1], normalises it itself,
and returns the score (through the checkpoint's calibration map, baked in), the uncalibrated score and the
bin probabilities. The file carries elta's metadata (spec, version, dataset). Every export ends with a parity
check on a few images (random inputs when none are given): the exported model against the PyTorch
:class:`~elta.engine.predictor.Predictor` on the same pixels; above ``tolerance`` the export is refused and
nothing is written. An INT8 model (onnxruntime's static quantisation, calibrated on training images, or its
dynamic one) cannot match to 1e-4: its deviation is reported instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from elta import __version__
from elta.config import RunConfig
from elta.data.dataset import ImageListDataset, collate
from elta.data.images import list_images
from elta.data.transforms import ImageTransform
from elta.engine.evaluate import select_split
from elta.engine.onnx_model import EXPORT_EXTRA, dataset_name, onnx_session
from elta.engine.predictor import Predictions, Predictor
from elta.engine.prepare import read_dataset
from elta.engine.runtime import Runtime
from elta.errors import ConfigError, ExportError, UnavailableError
from elta.models.checkpoint import Checkpoint, load_checkpoint
from elta.models.export_graph import (
    INPUT_NAME,
    ExportGraph,
    export_metadata,
    readable_metadata,
    to_onnx,
)
from elta.utils import atomic_write

__all__ = ["FORMATS", "ExportResult", "describe", "export_checkpoint", "quantization_images"]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
QUANTIZE = ("int8",)
QUANTIZE_METHODS = ("static", "dynamic")
TOLERANCE = 1e-4
RANDOM_INPUTS = 4


@dataclass
class ExportResult:
    """What was written and how closely it reproduces PyTorch: ``deviation`` maps each output to
    max |exported − PyTorch| over the check inputs (``checked_on``: how many, and whether images or random)."""

    path: Path
    format: str
    exporter: str
    outputs: list[str]
    deviation: dict[str, float]
    checked_on: str
    quantized: str = ""
    metadata: dict = field(default_factory=dict)


def _check_inputs(spec, images: Sequence) -> tuple[torch.Tensor, str]:
    """RGB in [0, 1] [N, 3, S, S]: ``images`` through the eval resize (no normalisation), or random pixels."""
    size = spec.image_size
    if not images:
        generator = torch.Generator().manual_seed(0)
        return torch.rand(RANDOM_INPUTS, 3, size, size, generator=generator), f"{RANDOM_INPUTS} random inputs"
    transform = ImageTransform.from_spec(spec, train=False, normalize=False)
    dataset = ImageListDataset(list_images(list(images)), transform)
    batch = collate([dataset[i] for i in range(len(dataset))])
    if batch.failures:
        _, reason = batch.failures[0]
        raise ConfigError(f"parity image {reason}")
    return batch.images, f"{len(batch)} images"


def _reference(predictor: Predictor, pixels: torch.Tensor) -> Predictions:
    """The PyTorch Predictor's predictions of ``pixels`` (RGB in [0, 1]), normalised as its transform does."""
    transform = predictor.transform
    normalised = (pixels - torch.tensor(transform.mean).view(1, 3, 1, 1)) / torch.tensor(transform.std).view(
        1, 3, 1, 1
    )
    return predictor.predict_images(list(normalised), normalized=True, desc="parity check")


def _deviation(outputs: dict[str, np.ndarray], ref: Predictions) -> dict[str, float]:
    expected = {
        "score": ref.score,
        "score_uncalibrated": ref.uncalibrated,
        "probabilities": ref.dist,
    }
    return {
        name: float(np.abs(np.asarray(value, dtype=np.float64) - expected[name]).max())
        for name, value in outputs.items()
    }


def quantization_images(checkpoint: Checkpoint, n: int, seed: int = 0) -> list[str]:
    """``n`` images of the checkpoint's training split (drawn with ``seed``), for static INT8 calibration."""
    if not checkpoint.config:
        raise ConfigError(
            f"{checkpoint.path}: the checkpoint records no training data; give --quantize-images FOLDER "
            "(a few hundred photos like the training set) or --quantize-method dynamic"
        )
    frame = read_dataset(RunConfig.from_dict(checkpoint.config)).frame
    train = select_split(frame, "train")
    rows = np.random.default_rng(seed).permutation(len(train))[: min(n, len(train))]
    return train["path"].astype(str).iloc[np.sort(rows)].tolist()


def _quantize(
    fp32: Path, out: Path, method: str, images: Sequence[str], transform: ImageTransform, batch_size: int
) -> None:
    """onnxruntime's INT8 quantisation of the model at ``fp32`` into ``out`` (QDQ, per-channel weights)."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise UnavailableError(f"INT8 quantisation needs onnxruntime: {EXPORT_EXTRA}") from exc
    prepared = fp32.with_name("prepared.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    if method == "dynamic":
        with _quiet_root_logger():
            quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8)
        return
    dataset = ImageListDataset(list(images), transform)

    class Reader(CalibrationDataReader):
        """Batches of training images, RGB in [0, 1], as the graph takes them."""

        def __init__(self) -> None:
            self.starts = iter(range(0, len(dataset), batch_size))

        def get_next(self) -> dict | None:
            start = next(self.starts, None)
            if start is None:
                return None
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            for _, reason in batch.failures:
                log.warning("INT8 calibration skips %s", reason)
            return {INPUT_NAME: batch.images.numpy()} if len(batch) else self.get_next()

    with _quiet_root_logger():
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantiser logs a warning on the root logger for every 1-D weight it leaves per-tensor
    (norm scales, biases); those are expected, so only its errors are shown."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _with_metadata(path: Path, props: dict[str, str]) -> bytes:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    return proto.SerializeToString()


def export_checkpoint(
    checkpoint: Checkpoint | str | Path,
    out: str | Path,
    *,
    format: str = "onnx",
    opset: int = 18,
    dynamic_batch: bool = False,
    image_size: int | None = None,
    calibrated: bool = True,
    quantize: str | None = None,
    quantize_method: str = "static",
    quantize_images: Sequence | None = None,
    quantize_count: int = 200,
    images: Sequence = (),
    tolerance: float = TOLERANCE,
) -> ExportResult:
    """Export ``checkpoint`` to ``out`` as ``format`` (onnx | torchscript) and check it; see the module docstring.

    ``image_size``: export for another input size than the training one (convolutional backbones). ``images``:
    the parity check's images (paths, folders, lists), else random inputs. ``quantize="int8"`` (ONNX only):
    ``quantize_method`` static (calibrated on ``quantize_images``, default ``quantize_count`` images of the
    training split) or dynamic. Raises :class:`~elta.errors.ExportError` (nothing written) when an fp32 export
    deviates from PyTorch by more than ``tolerance`` on any output.
    """
    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}; got {format!r}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE)}; got {quantize!r}")
    if quantize and format != "onnx":
        raise ConfigError("--quantize int8 uses onnxruntime's quantisation: export with --format onnx")
    if quantize_method not in QUANTIZE_METHODS:
        raise ConfigError(f"--quantize-method must be static or dynamic; got {quantize_method!r}")
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(checkpoint)
    if image_size:
        spec = checkpoint.spec
        resize = round(spec.resize * image_size / spec.image_size)
        spec = dataclasses.replace(spec, image_size=image_size, resize=resize)
        checkpoint = dataclasses.replace(checkpoint, spec=spec)
    out = Path(out)
    model = checkpoint.build_model("cpu")
    graph = ExportGraph(model, calibrated=calibrated).eval()
    spec = model.spec
    predictor = Predictor(model, Runtime(batch_size=32, workers=0), calibrated=graph.calibration is not None)
    pixels, checked_on = _check_inputs(spec, images)
    reference = _reference(predictor, pixels)
    example = torch.rand(2, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(1))
    dataset = dataset_name(checkpoint)

    if format == "torchscript":
        exporter = "torch.jit.trace"
        meta = export_metadata(graph, version=__version__, dataset=dataset, exporter=exporter)
        with torch.no_grad():
            traced = torch.jit.trace(graph, example)
            outputs = dict(zip(graph.output_names, (o.numpy() for o in traced(pixels)), strict=True))
        deviation = _deviation(outputs, reference)
        _refuse_if_off(deviation, tolerance, out, checked_on)
        extra = {"elta.json": json.dumps(meta)}
        atomic_write(out, lambda fh: torch.jit.save(traced, fh, _extra_files=extra))
        return ExportResult(out, format, exporter, graph.output_names, deviation, checked_on, metadata=meta)

    try:
        import onnx
    except ImportError as exc:
        raise UnavailableError(f"ONNX export needs onnx and onnxruntime: {EXPORT_EXTRA}") from exc
    with torch.no_grad():
        proto, exporter = to_onnx(
            graph, example if dynamic_batch else example[:1], opset=opset, dynamic_batch=dynamic_batch
        )
    meta = export_metadata(graph, version=__version__, dataset=dataset, exporter=exporter)
    meta["dynamic_batch"] = dynamic_batch
    if quantize:
        meta["quantized"] = f"{quantize} {quantize_method}"
    onnx.helper.set_model_props(proto, readable_metadata(meta))
    data = proto.SerializeToString()
    if quantize:
        transform = ImageTransform.from_spec(spec, train=False, normalize=False)
        chosen = []  # dynamic quantisation needs no images
        if quantize_method == "static":
            chosen = (
                list_images(list(quantize_images))
                if quantize_images
                else quantization_images(checkpoint, quantize_count)
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            fp32.write_bytes(data)
            _quantize(fp32, int8, quantize_method, chosen, transform, 16 if dynamic_batch else 1)
            data = _with_metadata(int8, readable_metadata(meta))
        log.info(
            "INT8 %s quantisation%s",
            quantize_method,
            f" calibrated on {len(chosen)} images" if chosen else "",
        )
    session = onnx_session(data)
    outputs = _run_session(session, pixels, graph.output_names)
    deviation = _deviation(outputs, reference)
    if not quantize:
        _refuse_if_off(deviation, tolerance, out, checked_on)
    atomic_write(out, lambda fh: fh.write(data))
    return ExportResult(
        out, format, exporter, graph.output_names, deviation, checked_on,
        quantized=meta.get("quantized", ""), metadata=meta,
    )  # fmt: skip


def _run_session(session, pixels: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
    """The session's outputs for ``pixels``, one image at a time when its batch dimension is fixed."""
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else len(pixels)
    parts = [
        session.run(names, {INPUT_NAME: pixels[i : i + step].numpy()}) for i in range(0, len(pixels), step)
    ]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}


def _refuse_if_off(deviation: dict[str, float], tolerance: float, out: Path, checked_on: str) -> None:
    worst = max(deviation, key=deviation.get)
    if not deviation[worst] <= tolerance:  # NaN is refused too
        raise ExportError(
            f"{out}: not written: the exported model's {worst} differs from PyTorch by {deviation[worst]:.3g} "
            f"on {checked_on} (tolerance {tolerance:g})"
        )


def describe(result: ExportResult) -> str:
    """A few lines for the command line: the file, its outputs and the parity check."""
    lines = [
        f"wrote {result.path} ({result.format}, {result.exporter}; outputs: {', '.join(result.outputs)})"
    ]
    checks = ", ".join(f"{name} {value:.2g}" for name, value in result.deviation.items())
    if result.quantized:
        lines.append(f"{result.quantized}: max |exported − PyTorch fp32| on {result.checked_on}: {checks}")
    else:
        lines.append(f"parity on {result.checked_on}: max |exported − PyTorch| {checks} (tolerance passed)")
    return "\n".join(lines)
