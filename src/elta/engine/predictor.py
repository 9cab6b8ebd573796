"""Every inference in elta: a :class:`Predictor` is a model and a :class:`~elta.engine.runtime.Runtime`.

Evaluation, calibration, ``elta predict``, pseudo-labelling, ablations, the trainer's validation and the
frozen-backbone feature cache all score through it, so a checkpoint is scored the same way everywhere: the eval
transform of its spec, the backbone under the runtime's precision, the head in float32, and the checkpoint's
calibration map on the score when there is one (unless switched off).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from elta.calibration import calibrated_scores
from elta.data.dataset import AnnotationDataset, ImageListDataset, ImageStreamDataset, dist_columns
from elta.data.images import IMAGE_EXTENSIONS, LIST_SUFFIXES, list_images
from elta.data.transforms import ImageTransform
from elta.engine.onnx_model import OnnxModel, open_model
from elta.engine.runtime import Runtime
from elta.errors import ConfigError, ImageLoadError, IncompatibleDataError, UnavailableError
from elta.models.checkpoint import Checkpoint
from elta.models.model import AestheticModel, ModelOutput, ModelSpec
from elta.progress import progress_bar
from elta.utils import atomic_write, atomic_write_text

__all__ = ["Predictions", "Predictor", "load", "score_format", "write_scores"]


@dataclass
class Predictions:
    """Per-item results in input order; items whose image failed hold NaN and their reason.

    ``score`` went through the checkpoint's calibration map when ``uncalibrated`` is set (the model's own score).
    """

    score: np.ndarray  # [N] on the dataset's scale
    std: np.ndarray  # [N], NaN for a scalar head
    dist: np.ndarray | None  # [N, K] the model's distribution (never calibrated)
    errors: list[str]  # "" where the item was scored
    uncalibrated: np.ndarray | None = None  # [N]

    @property
    def ok(self) -> np.ndarray:
        return np.array([e == "" for e in self.errors], dtype=bool)

    def table(self, paths: Sequence, index: Sequence[int] | None = None) -> pd.DataFrame:
        """One row per item, the columns of every scores file: path, score, std, p1..pK (a distribution head),
        score_uncalibrated (with a calibration map), index (when given), error."""
        frame = pd.DataFrame({"path": list(paths), "score": self.score, "std": self.std})
        if self.dist is not None:
            frame[[f"p{k + 1}" for k in range(self.dist.shape[1])]] = self.dist
        if self.uncalibrated is not None:  # the score went through the map, the distribution did not
            frame["score_uncalibrated"] = self.uncalibrated
        if index is not None:
            frame["index"] = np.asarray(index, dtype=np.int64)
        frame["error"] = self.errors
        return frame

    def select(self, rows: np.ndarray) -> Predictions:
        """The predictions of ``rows`` (a boolean mask or indices), in that order."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        arrays = {name: getattr(self, name) for name in ("score", "std", "dist", "uncalibrated")}
        picked = {name: None if values is None else values[rows] for name, values in arrays.items()}
        return Predictions(**picked, errors=[self.errors[i] for i in rows])


class Predictor:
    """A model ready for inference on its dataset's scale.

    >>> predictor = elta.load("runs/demo/best.pt")
    >>> predictor.score(["a.jpg", "photos/"])      # DataFrame: path, score, std, p1..pK, error
    """

    def __init__(
        self, model: AestheticModel | OnnxModel, runtime: Runtime | None = None, *, calibrated: bool = True
    ) -> None:
        self.runtime = runtime or Runtime()
        self.model = self.runtime.precision.prepare(model.to(self.runtime.device))
        self.calibrated = calibrated and bool(model.spec.calibration)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint | str | Path,
        runtime: Runtime | None = None,
        *,
        calibrated: bool = True,
        backend: str = "auto",
    ) -> Predictor:
        """From a checkpoint (elta's, a run folder, or the original release's) or an ``elta export`` ONNX file.

        ``backend``: auto (an ``.onnx`` file on onnxruntime, a checkpoint on PyTorch), torch, or onnx (a
        checkpoint is exported in memory and run by onnxruntime)."""
        runtime = runtime or Runtime()
        return cls(open_model(checkpoint, runtime.device, backend), runtime, calibrated=calibrated)

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def transform(self) -> ImageTransform:
        """The eval transform of the model's spec (resize to image_size, its normalisation unless the model
        normalises its input itself, as an exported one does)."""
        return ImageTransform.from_spec(self.spec, train=False, normalize=not self.model.normalizes_input)

    # --- what can be scored -----------------------------------------------------------------------------

    def predict_frame(self, frame: pd.DataFrame, desc: str = "scoring") -> Predictions:
        """Rows of an annotation frame (column ``path``), in order; its vote bins must match the head's."""
        cols = dist_columns(frame)
        if self.spec.head == "distribution" and cols and len(cols) != self.spec.num_bins:
            raise IncompatibleDataError(
                f"the model predicts {self.spec.num_bins} rating bins but the dataset has {len(cols)}: "
                "use a dataset with the same rating scale"
            )
        return self.predict(AnnotationDataset(frame, self.transform), desc=desc)

    def predict_images(self, items: Sequence, desc: str = "scoring", normalized: bool = False) -> Predictions:
        """Image paths, encoded bytes, PIL images, arrays or tensors (see :class:`ImageListDataset`)."""
        return self.predict(ImageListDataset(list(items), self.transform, normalized=normalized), desc=desc)

    def predict_stream(
        self, items: Iterable, desc: str = "scoring"
    ) -> Iterator[tuple[np.ndarray, Predictions]]:
        """Score a stream of images without holding it: yields (positions, predictions) of consecutive items, in
        stream order, every position exactly once; memory does not grow with the stream.

        Each run of yielded positions ends at a multiple of the batch size (or at the end of the stream), so a
        stream restarted at such a position is batched as before and scores the same. ``items`` is iterated
        by every loader process (see :class:`~elta.data.dataset.ImageStreamDataset`): paths, encoded bytes,
        or an ImageLoadError for an item known to be unusable (its reason is reported).
        """
        block = self.runtime.batch_size
        dataset = ImageStreamDataset(items, self.transform, block)
        errors: dict[int, str] = {}
        done = 0  # every position below has been yielded
        for idx, out in self._batches(dataset, self._forward, errors, desc, progress=False):
            stop = (int(idx[0]) // block + 1) * block
            yield self._stream_rows(idx, out, errors, done, stop)
            done = stop
        if errors:  # trailing blocks in which nothing could be loaded
            yield self._stream_rows(np.empty(0, np.int64), None, errors, done, max(errors) + 1)

    def _stream_rows(
        self, idx: np.ndarray, out: ModelOutput | None, errors: dict[int, str], start: int, stop: int
    ) -> tuple[np.ndarray, Predictions]:
        """Positions start..stop−1 that were loaded (``idx``, scored as ``out``) or failed (in ``errors``)."""
        failed = sorted(p for p in errors if start <= p < stop)
        positions = np.sort(np.concatenate([idx, np.asarray(failed, dtype=np.int64)]))
        preds = self._unscored([errors.pop(p, "") for p in positions.tolist()])
        if out is not None:
            self._fill(preds, np.searchsorted(positions, idx), out)
        return positions, self._calibrate(preds)

    def predict_features(
        self, frame: pd.DataFrame, features: torch.Tensor, failed: dict[int, str], desc: str = "scoring"
    ) -> Predictions:
        """Rows of ``frame`` from their pooled backbone features [N, D] (a frozen backbone's cache)."""
        return self.predict(AnnotationDataset(frame, None, features=features, failed=failed), desc=desc)

    def predict(self, dataset: Dataset, desc: str = "scoring") -> Predictions:
        """Score every item of ``dataset`` (samples as in :mod:`elta.data.dataset`).

        Under torchrun (``runtime.processes``) each process scores a contiguous shard and every process receives
        all predictions: each item is scored exactly once.
        """
        forward = self._head_on_features if getattr(dataset, "features", None) is not None else self._forward
        if self.runtime.processes.distributed:
            return self._calibrate(self._predict_sharded(dataset, forward, desc))
        return self._calibrate(self._predict_local(dataset, forward, desc, self.runtime.progress))

    def backbone_features(
        self, frame: pd.DataFrame, desc: str = "caching features"
    ) -> tuple[torch.Tensor, dict]:
        """Pooled backbone outputs [N, D] (float32, on the CPU) of the rows of ``frame``, and the failed rows."""
        dataset = AnnotationDataset(frame, self.transform)
        features = torch.zeros(len(frame), self.model.backbone.num_features)
        errors = [""] * len(frame)
        backbone = lambda images: self.runtime.precision.features(self.model.backbone, images)  # noqa: E731
        for idx, out in self._batches(dataset, backbone, errors, desc, self.runtime.progress):
            features[torch.from_numpy(idx)] = out.cpu()
        return features, {i: e for i, e in enumerate(errors) if e}

    def score(self, images, normalized: bool = False) -> pd.DataFrame:
        """Score images: paths (files; folders and .txt/.lst lists are expanded), encoded bytes, PIL images,
        arrays [H, W(, 3)] and tensors [3, H, W] (uint8, or floats in [0, 1]), or a batch [B, 3, H, W].

        With ``normalized`` the tensors are model inputs already (resized and normalised as :attr:`transform`
        does). An image that cannot be used (a missing file, a broken one, pixels out of range) gets its reason
        in the ``error`` column and the others are scored. Columns: path, score, std, p1..pK,
        score_uncalibrated (with a calibration map), error.
        """
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        elif isinstance(images, (str, Path, bytes, np.ndarray, torch.Tensor)) or hasattr(images, "convert"):
            images = [images]
        items, names = [], []
        for entry in images:
            if isinstance(entry, (str, Path)) and (
                Path(entry).is_dir() or Path(entry).suffix in LIST_SUFFIXES
            ):
                found = list_images([entry])
                items += found
                names += [str(p) for p in found]
            else:  # a missing file is reported in its row, not for the whole call
                names.append(str(entry) if isinstance(entry, (str, Path)) else f"image[{len(items)}]")
                items.append(entry)
        if not items:
            given = ", ".join(map(str, images)) or "(nothing given)"
            raise ImageLoadError(given, f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) here")
        return self.predict_images(items, normalized=normalized).table(names)

    @property
    def score_range(self) -> tuple[float, float]:
        """The rating scale scores come back on (the training dataset's)."""
        lo, hi = self.spec.score_range
        return float(lo), float(hi)

    @property
    def num_bins(self) -> int:
        """Rating bins of the predicted distribution (0 for a scalar head)."""
        return self.spec.num_bins

    def check_scale(self, score_range: Sequence[float], source: str) -> None:
        """Errors unless ``source`` is rated on the model's scale (metrics and calibration need the same one)."""
        ours = [float(v) for v in self.spec.score_range]
        if not np.allclose(ours, [float(v) for v in score_range]):
            raise IncompatibleDataError(
                f"the model scores on {ours} but {source} is rated on {[float(v) for v in score_range]}: "
                "use a dataset with the model's rating scale"
            )

    # --- how ---------------------------------------------------------------------------------------------

    def _forward(self, images: torch.Tensor) -> ModelOutput:
        """The backbone under the runtime's precision, the head in float32 (an exported model: its graph)."""
        if isinstance(self.model, OnnxModel):
            return self.model(images)
        return self.model.forward_head(self.runtime.precision.features(self.model.forward_features, images))

    def _head_on_features(self, features: torch.Tensor) -> ModelOutput:
        return self.model.forward_head(self.runtime.precision.features(self.model.neck, features))

    @torch.no_grad()
    def _batches(
        self, dataset: Dataset, forward: Callable, errors: list[str], desc: str, progress: bool
    ) -> Iterator[tuple[np.ndarray, object]]:
        """(dataset indices, ``forward(inputs)``) batch by batch, in eval mode; failures go into ``errors``."""
        self.model.eval()
        device = self.runtime.device
        loader = self.runtime.loader(dataset, shuffle=False)
        for batch in progress_bar(loader, desc=desc, unit="batch", enabled=progress):
            for index, reason in batch.failures:
                errors[index] = reason
            if len(batch):
                yield batch.indices.numpy(), forward(batch.images.to(device, non_blocking=True))

    def _unscored(self, errors: list[str]) -> Predictions:
        """Predictions of ``len(errors)`` items, NaN until :meth:`_fill` writes their outputs."""
        n, k = len(errors), self.spec.num_bins
        dist = np.full((n, k), np.nan) if k else None
        return Predictions(score=np.full(n, np.nan), std=np.full(n, np.nan), dist=dist, errors=errors)

    def _fill(self, preds: Predictions, rows: np.ndarray, out: ModelOutput) -> None:
        """Write one batch's outputs into ``rows`` of ``preds``."""
        preds.score[rows] = out.score.double().cpu().numpy()
        if out.distribution is not None:
            preds.dist[rows] = out.distribution.double().cpu().numpy()
            preds.std[rows] = out.score_std(self.model.centers).double().cpu().numpy()

    def _calibrate(self, preds: Predictions) -> Predictions:
        if not self.calibrated:
            return preds
        return dataclasses.replace(
            preds, score=calibrated_scores(self.spec, preds.score), uncalibrated=preds.score
        )

    def _predict_local(self, dataset: Dataset, forward: Callable, desc: str, progress: bool) -> Predictions:
        preds = self._unscored([""] * len(dataset))
        for idx, out in self._batches(dataset, forward, preds.errors, desc, progress):
            self._fill(preds, idx, out)
        return preds

    def _predict_sharded(self, dataset: Dataset, forward: Callable, desc: str) -> Predictions:
        processes = self.runtime.processes
        n = len(dataset)
        own = processes.share(range(n))
        part = self._predict_local(
            _Shard(dataset, own), forward, desc, self.runtime.progress and processes.is_main
        )
        shards = processes.gather_objects((own, part))
        order = np.concatenate([np.asarray(rows, dtype=np.int64) for rows, _ in shards])
        if not np.array_equal(np.sort(order), np.arange(n)):
            raise RuntimeError(f"{desc}: the processes' shards do not cover the {n} items exactly once")
        parts = [shard for _, shard in shards]
        joined = {name: np.concatenate([getattr(p, name) for p in parts]) for name in ("score", "std")}
        dist = None if parts[0].dist is None else np.concatenate([p.dist for p in parts])
        errors = [e for p in parts for e in p.errors]
        return Predictions(**joined, dist=dist, errors=errors).select(np.argsort(order))  # in dataset order


class _Shard(Dataset):
    """Items ``rows`` of a dataset, numbered 0..len(rows)−1 (samples carry their position as ``index``)."""

    def __init__(self, dataset: Dataset, rows: list[int]) -> None:
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict:
        return {**self.dataset[self.rows[position]], "index": position}


def load(
    checkpoint: str | Path,
    device: str = "auto",
    batch_size: int = 32,
    *,
    amp: str = "auto",
    workers: int | None = None,
    calibrated: bool = True,
    backend: str = "auto",
) -> Predictor:
    """Load a checkpoint (file, run folder, or an original-release file) or an ``elta export`` ONNX file for
    scoring; ``backend`` auto | torch | onnx as in :meth:`Predictor.from_checkpoint`."""
    runtime = Runtime.create(device, amp=amp, batch_size=batch_size, workers=workers)
    return Predictor.from_checkpoint(checkpoint, runtime, calibrated=calibrated, backend=backend)


SCORE_FORMATS = (".csv", ".json", ".jsonl", ".parquet")


def score_format(out: str | Path) -> str:
    """The format of a scores file by its suffix; an unknown one, or Parquet without pyarrow, is an error."""
    suffix = Path(out).suffix.lower()
    if suffix not in SCORE_FORMATS:
        raise ConfigError(
            f"{out}: scores are written as {', '.join(SCORE_FORMATS)}; not {suffix or 'no suffix'}"
        )
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise UnavailableError(f"{out}: Parquet needs pyarrow (pip install pyarrow)") from exc
    return suffix


def write_scores(frame: pd.DataFrame, out: str | Path) -> Path:
    """Write scores by the suffix of ``out``: .csv, .json (a list; NaN becomes null), .jsonl (a record a line) or
    .parquet (needs pyarrow). Floats keep full precision."""
    suffix = score_format(out)
    if suffix == ".parquet":
        return atomic_write(out, lambda fh: frame.to_parquet(fh, index=False))
    if suffix == ".csv":
        return atomic_write_text(out, frame.to_csv(index=False))  # floats as repr: they read back exactly
    records = frame.replace({np.nan: None}).to_dict("records")
    if suffix == ".json":
        return atomic_write_text(out, json.dumps(records, indent=1))
    return atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
