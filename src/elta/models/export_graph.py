"""The model as a graph an exporter can trace: images in [0, 1] in, plain tensors out.

:class:`ExportGraph` wraps an :class:`~elta.models.model.AestheticModel` for ``torch.onnx.export`` and
``torch.jit.trace`` (both refuse a forward that returns a dataclass). It takes a float RGB batch [N, 3, H, W]
in [0, 1], normalises it with the backbone's mean and std inside the graph, and returns a tuple of tensors named
by :attr:`ExportGraph.output_names`:

- ``score`` [N] on the dataset's scale, through the checkpoint's calibration map when one is baked in;
- ``score_uncalibrated`` [N], the model's own score (only with a baked map);
- ``probabilities`` [N, K], the predicted distribution over the K rating bins (distribution head only).

The calibration map (:mod:`elta.calibration`: affine, or piecewise linear through knots with the chord slope
beyond the end knots, clipped to the score range) is computed in float64 from the float32 score, as
:func:`elta.calibration.calibrated_scores` does, so exported and PyTorch scores agree to float32 rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from elta.calibration import Calibration
from elta.errors import ExportError
from elta.models.model import AestheticModel

__all__ = ["CalibrationMap", "ExportGraph"]


class CalibrationMap(nn.Module):
    """A :class:`~elta.calibration.Calibration` as torch ops: scores [N] (any float) -> float64 [N].

    The knot interval of each score is found by counting the inner knots at or below it (what
    ``torch.searchsorted(x, score, right=True)`` gives, written with a comparison and a sum so that every
    exporter and runtime has the ops), then interpolated linearly; below the first and above the last knot the
    line continues with the chord slope of all knots, and the result is clipped to the score range.
    """

    def __init__(self, calibration: Calibration) -> None:
        super().__init__()
        self.method = calibration.method
        lo, hi = calibration.score_range
        self.register_buffer("bounds", torch.tensor([lo, hi], dtype=torch.float64))
        if self.method == "affine":
            params = [calibration.params["a"], calibration.params["b"]]
            self.register_buffer("affine", torch.tensor(params, dtype=torch.float64))
        else:
            x = torch.tensor(calibration.params["x"], dtype=torch.float64)
            y = torch.tensor(calibration.params["y"], dtype=torch.float64)
            self.register_buffer("x", x)
            self.register_buffer("y", y)
            self.register_buffer("slope", (y[-1:] - y[:1]) / (x[-1:] - x[:1]))

    def forward(self, score: torch.Tensor) -> torch.Tensor:
        p = score.to(torch.float64)
        if self.method == "affine":
            out = self.affine[0] * p + self.affine[1]
        else:
            x, y = self.x, self.y
            # interval i: x[i] <= p < x[i + 1] for inner points; 0 below x[1], K-2 at or above x[K-2]
            segment = (p.unsqueeze(1) >= x[1:-1].unsqueeze(0)).to(torch.int64).sum(dim=1)
            x0, x1 = x[segment], x[segment + 1]
            y0, y1 = y[segment], y[segment + 1]
            inside = y0 + (p - x0) / (x1 - x0) * (y1 - y0)
            below = y[0] + self.slope * (p - x[0])
            above = y[-1] + self.slope * (p - x[-1])
            out = torch.where(p < x[0], below, torch.where(p > x[-1], above, inside))
        return torch.minimum(torch.maximum(out, self.bounds[0]), self.bounds[1])


class ExportGraph(nn.Module):
    """``model`` for export: [N, 3, H, W] RGB in [0, 1] -> (score [N], [score_uncalibrated [N]],
    [probabilities [N, K]]), float32; see the module docstring. ``calibrated``: bake the spec's map in."""

    def __init__(self, model: AestheticModel, calibrated: bool = True) -> None:
        super().__init__()
        self.model = model.eval()
        spec = model.spec
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.calibration = (
            CalibrationMap(Calibration.from_dict(spec.calibration))
            if calibrated and spec.calibration
            else None
        )
        self.distribution = spec.head == "distribution"
        self.eval()

    @property
    def output_names(self) -> list[str]:
        names = ["score"]
        if self.calibration is not None:
            names.append("score_uncalibrated")
        if self.distribution:
            names.append("probabilities")
        return names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model((images - self.mean) / self.std)
        score = out.score.float()
        outputs = [score]
        if self.calibration is not None:
            outputs = [self.calibration(score).float(), score]
        if self.distribution:
            outputs.append(out.distribution.float())
        return tuple(outputs)


METADATA_KEY = "elta"
INPUT_NAME = "images"


def export_metadata(graph: ExportGraph, *, version: str, dataset: str, exporter: str) -> dict:
    """What an exported file carries about itself: the spec (with the map only when it is baked in), the
    input and outputs, the elta version, the training dataset and the exporter."""
    spec = graph.model.spec.to_dict()
    if graph.calibration is None:
        spec["calibration"] = None
    return {
        "format": "elta-export",
        "elta_version": version,
        "dataset": dataset,
        "exporter": exporter,
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "pixels": "RGB floats in [0, 1], normalised in the graph",
        },
        "outputs": graph.output_names,
        "calibration_baked": graph.calibration is not None,
        "spec": spec,
    }


def readable_metadata(meta: dict) -> dict[str, str]:
    """The metadata as flat strings for an ONNX file's ``metadata_props`` (the full JSON under ``elta``, and
    the main facts one by one so that model viewers show them)."""
    import json

    spec = meta["spec"]
    calibration = spec.get("calibration")
    return {
        METADATA_KEY: json.dumps(meta),
        "elta_version": meta["elta_version"],
        "backbone": spec["backbone"],
        "input_size": str(spec["image_size"]),
        "resize": str(spec["resize"]),
        "score_range": json.dumps(spec["score_range"]),
        "bin_centers": json.dumps(spec["centers"] if spec["head"] == "distribution" else []),
        "calibration": calibration["method"] if calibration else "none",
        "dataset": meta["dataset"],
        "outputs": ",".join(meta["outputs"]),
    }


def to_onnx(graph: ExportGraph, example: torch.Tensor, *, opset: int = 18, dynamic_batch: bool = True):
    """``torch.onnx.export`` of ``graph`` on ``example`` [N, 3, S, S]: the dynamo exporter, else (when it
    fails on this model) the TorchScript-based one. Returns ``(onnx.ModelProto, exporter name)``; the batch
    dimension is dynamic with ``dynamic_batch``."""
    import contextlib
    import io
    import logging

    import onnx

    log = logging.getLogger(__name__)
    names = {"input_names": [INPUT_NAME], "output_names": graph.output_names, "opset_version": opset}
    try:
        shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            program = torch.onnx.export(
                graph, (example,), dynamo=True, dynamic_shapes=shapes, verbose=False, **names
            )
        return program.model_proto, "torch.onnx dynamo"
    except Exception as exc:  # the dynamo exporter does not cover every backbone yet
        log.info(
            "the dynamo exporter failed (%s: %s); using the TorchScript-based one", type(exc).__name__, exc
        )
    axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in graph.output_names}}
    buffer = io.BytesIO()
    try:
        torch.onnx.export(
            graph, (example,), buffer, dynamo=False, dynamic_axes=axes if dynamic_batch else None, **names
        )
    except Exception as exc:
        raise ExportError(
            f"{graph.model.spec.backbone}: neither ONNX exporter of torch {torch.__version__} handles this "
            f"model ({type(exc).__name__}: {exc}); try --format torchscript"
        ) from exc
    return onnx.load_from_string(buffer.getvalue()), "torch.onnx torchscript"
