"""An exported ONNX model, run by onnxruntime, in the place of an :class:`~elta.models.AestheticModel`.

:class:`OnnxModel` offers what the :class:`~elta.engine.predictor.Predictor` uses of a model (its spec, bin
centres, ``eval``/``to`` and a call giving a :class:`~elta.models.heads.ModelOutput`), so an ``.onnx`` file is
scored by the same batching, image loading, calibration and output columns as a checkpoint. Its spec comes from
the metadata ``elta export`` writes into the file. The graph normalises its input itself
(:attr:`normalizes_input`), so the Predictor feeds it resized RGB in [0, 1].

The score given to the Predictor is the model's own (``score_uncalibrated`` where the export baked a map in):
the Predictor applies the stored map once, as for a checkpoint, and ``--no-calibration`` keeps working. The
export checked that the graph's own ``score`` output equals that to 1e-4.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from elta import __version__
from elta.errors import CheckpointError, ConfigError, UnavailableError
from elta.models.checkpoint import Checkpoint, load_checkpoint
from elta.models.export_graph import INPUT_NAME, METADATA_KEY, ExportGraph, export_metadata, to_onnx
from elta.models.heads import ModelOutput
from elta.models.model import AestheticModel, ModelSpec

__all__ = ["BACKENDS", "OnnxModel", "is_onnx_file", "onnx_session", "open_model", "read_onnx_metadata"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
EXPORT_EXTRA = "pip install 'elta[export]'"


def is_onnx_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise UnavailableError(f"scoring an ONNX model needs onnxruntime: {EXPORT_EXTRA}") from exc
    return onnxruntime


def onnx_session(model: str | Path | bytes, device: torch.device | str = "cpu", threads: int = 0):
    """An onnxruntime session on ``device`` (cpu, or cuda with onnxruntime-gpu) for a file or serialised model.

    ``threads`` > 0 caps the intra-op threads (0: onnxruntime's default, one per core)."""
    ort = _onnxruntime()
    device = torch.device(device)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UnavailableError(
                "an ONNX model on CUDA needs onnxruntime-gpu (pip install onnxruntime-gpu); or use --device cpu"
            )
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), *providers]
    elif device.type != "cpu":
        raise ConfigError(f"ONNX models run on cpu or cuda here, not on {device.type}; use --device cpu")
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
        raise CheckpointError(f"{model if not isinstance(model, bytes) else 'ONNX model'}: {exc}") from exc


def read_onnx_metadata(session, source: str) -> dict:
    """The metadata ``elta export`` stored in an ONNX model, or a :class:`CheckpointError` naming ``source``."""
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise CheckpointError(
            f"{source}: an ONNX model without elta's metadata; only files written by `elta export` can be "
            "scored (they carry the score scale, bins and input size)"
        )
    try:
        meta = json.loads(props[METADATA_KEY])
        ModelSpec.from_dict(meta["spec"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{source}: elta's metadata in this ONNX model is unreadable ({exc})") from exc
    return meta


class OnnxModel:
    """An exported model on onnxruntime; see the module docstring."""

    normalizes_input = True  # the graph takes RGB in [0, 1]

    def __init__(self, session, meta: dict, source: str = "") -> None:
        self.session = session
        self.meta = meta
        self.source = source
        self.spec = ModelSpec.from_dict(meta["spec"])
        self.centers = torch.tensor(self.spec.centers, dtype=torch.float32)
        outputs = [o.name for o in session.get_outputs()]
        missing = {"score"} - set(outputs)
        if missing or [i.name for i in session.get_inputs()] != [INPUT_NAME]:
            raise CheckpointError(
                f"{source}: the ONNX graph's inputs/outputs ({outputs}) are not those of an elta export"
            )
        self._score = "score_uncalibrated" if "score_uncalibrated" in outputs else "score"
        self._dist = "probabilities" if "probabilities" in outputs else None
        batch = session.get_inputs()[0].shape[0]
        self._batch = batch if isinstance(batch, int) else 0  # 0: any batch size

    @classmethod
    def from_file(cls, path: str | Path, device: torch.device | str = "cpu", threads: int = 0) -> OnnxModel:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such ONNX file")
        session = onnx_session(path, device, threads)
        return cls(session, read_onnx_metadata(session, str(path)), str(path))

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, device: torch.device | str = "cpu", threads: int = 0
    ) -> OnnxModel:
        """A checkpoint exported in memory (no map baked in: the Predictor applies it), run by onnxruntime."""
        model = checkpoint.build_model("cpu")
        graph = ExportGraph(model, calibrated=False)
        size = model.spec.image_size
        proto, exporter = to_onnx(graph, torch.rand(2, 3, size, size))
        meta = export_metadata(
            graph, version=__version__, dataset=dataset_name(checkpoint), exporter=exporter
        )
        meta["spec"]["calibration"] = model.spec.calibration
        return cls(onnx_session(proto.SerializeToString(), device, threads), meta, checkpoint.path)

    @property
    def backbone(self):
        raise UnavailableError(
            f"{self.source}: an exported model runs as one graph; backbone features need the checkpoint"
        )

    def eval(self) -> OnnxModel:
        return self

    def to(self, *args, **kwargs) -> OnnxModel:
        return self  # the session's device was chosen when it was created

    def __call__(self, images: torch.Tensor) -> ModelOutput:
        """Images [B, 3, H, W] RGB in [0, 1] -> the model's output (float32, on the images' device).

        A graph exported with a fixed batch size runs the batch in pieces of that size."""
        pixels = images.detach().float().cpu().contiguous().numpy()
        names = [self._score] + ([self._dist] if self._dist else [])
        step = self._batch or len(pixels)
        parts = [
            self.session.run(names, {INPUT_NAME: pixels[i : i + step]}) for i in range(0, len(pixels), step)
        ]
        values = [
            torch.from_numpy(np.concatenate([p[k] for p in parts])).to(images.device)
            for k in range(len(names))
        ]
        return ModelOutput(
            features=images.new_zeros(len(images), 0),
            score=values[0],
            distribution=values[1] if self._dist else None,
        )


def dataset_name(checkpoint: Checkpoint) -> str:
    """The training dataset as the checkpoint records it: its annotation file and format."""
    if checkpoint.imported_from is not None:
        return "AVA (original ELTA release)"
    name = Path(str((checkpoint.config or {}).get("data", {}).get("data") or "")).name
    fmt = checkpoint.spec.dataset_format
    return f"{name} ({fmt})" if name and fmt else name or fmt or "unknown"


def open_model(
    source: Checkpoint | str | Path,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    threads: int = 0,
) -> AestheticModel | OnnxModel:
    """The model to score with: an ``.onnx`` file on onnxruntime; a checkpoint on PyTorch (``backend`` torch
    or auto) or exported in memory to onnxruntime (``backend`` onnx)."""
    if backend not in BACKENDS:
        raise ConfigError(f"--runtime must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if not isinstance(source, Checkpoint) and is_onnx_file(source):
        if backend == "torch":
            raise ConfigError(f"{source}: an ONNX model runs on onnxruntime; use --runtime onnx or auto")
        return OnnxModel.from_file(source, device, threads)
    checkpoint = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    if backend == "onnx":
        return OnnxModel.from_checkpoint(checkpoint, device, threads)
    return checkpoint.build_model(device)
