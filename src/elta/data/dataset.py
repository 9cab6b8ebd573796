"""Torch datasets over annotation frames and over plain image lists, tolerant of unreadable files.

A sample that cannot be loaded comes back with ``ok=False`` and the reason; :func:`collate` drops it from
the batch and hands the failures to the caller, which reports them (nothing is dropped silently).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from elta.data.images import load_image
from elta.data.transforms import ImageTransform
from elta.errors import ImageLoadError
from elta.utils import derive_seed

__all__ = [
    "AnnotationDataset",
    "EpochBatchSampler",
    "ImageListDataset",
    "ImageStreamDataset",
    "Batch",
    "collate",
    "dist_columns",
    "pixels_to_image",
]


def dist_columns(df: pd.DataFrame) -> list[str]:
    """The p1..pK columns of an annotation frame, in bin order."""
    cols = [c for c in df.columns if c.startswith("p") and c[1:].isdigit()]
    return sorted(cols, key=lambda c: int(c[1:]))


@dataclass
class Batch:
    """A collated batch; ``failures`` lists (index, reason) of samples that could not be loaded."""

    images: torch.Tensor  # [B, 3, H, W]
    indices: torch.Tensor  # [B] positions in the dataset
    mos: torch.Tensor | None = None  # [B]
    dist: torch.Tensor | None = None  # [B, K]
    weight: torch.Tensor | None = None  # [B] loss weights
    failures: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.indices.numel())


class AnnotationDataset(Dataset):
    """Rows of an annotation frame (``path``, ``mos``, optionally ``p1..pK`` and ``weight``) as model inputs.

    With ``features`` ([N, D], e.g. a frozen backbone's cached output) the rows yield those vectors
    instead of decoded images; rows listed in ``failed`` (index -> reason) yield their failure.

    Items are requested by row (augmented as for the epoch of :meth:`set_epoch`) or by ``(row, epoch)``,
    which loader workers that live across epochs need (:class:`EpochBatchSampler`).
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        transform: ImageTransform | None,
        seed: int = 0,
        features: torch.Tensor | None = None,
        failed: dict[int, str] | None = None,
    ) -> None:
        self.paths = frame["path"].astype(str).tolist()
        self.mos = torch.tensor(frame["mos"].to_numpy(dtype=np.float32))
        cols = dist_columns(frame)
        self.dist = torch.tensor(frame[cols].to_numpy(dtype=np.float32)) if cols else None
        ones = np.ones(len(frame), np.float32)
        self.weight = torch.tensor(frame["weight"].to_numpy(dtype=np.float32) if "weight" in frame else ones)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.features = features
        self.failed = failed or {}

    def set_epoch(self, epoch: int) -> None:
        """Training augmentations are a function of (seed, epoch, index)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def _input(self, index: int, epoch: int) -> torch.Tensor:
        if self.features is not None:
            return self.features[index]
        image = load_image(self.paths[index], target=self.transform.needed_size)
        seed = derive_seed(self.seed, epoch, index) if self.transform.train else None
        return self.transform(image, seed)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        if index in self.failed:
            return {"ok": False, "index": index, "reason": self.failed[index]}
        try:
            inputs = self._input(index, epoch)
        except ImageLoadError as exc:
            return {"ok": False, "index": index, "reason": str(exc)}
        sample = {"ok": True, "index": index, "image": inputs}
        sample |= {"mos": self.mos[index], "weight": self.weight[index]}
        if self.dist is not None:
            sample["dist"] = self.dist[index]
        return sample


class EpochBatchSampler(Sampler):
    """The batches of the current epoch, as ``(row, epoch)`` keys, for one DataLoader kept across epochs.

    Set each epoch's batches with :meth:`set_epoch` before iterating the loader; worker processes then
    stay alive between epochs (``persistent_workers``) and still augment each epoch differently.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.batches: list[list[int]] = []

    def set_epoch(self, epoch: int, batches: list[list[int]]) -> None:
        self.epoch, self.batches = epoch, batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches:
            yield [(index, self.epoch) for index in batch]

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class ImageListDataset(Dataset):
    """Images to score, in order: paths, encoded bytes, PIL images, arrays [H, W(, C)] or tensors [3, H, W].

    Arrays and tensors hold pixels as uint8 (0..255) or as floats in [0, 1]; they go through the same resize and
    normalisation as a file. With ``normalized`` the tensors are model inputs already (resized and normalised
    as ``transform`` does) and are passed through. An item that cannot be used yields its reason.
    """

    items: Sequence
    transform: ImageTransform
    normalized: bool = False

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.sample(self.items[index], index)

    def sample(self, item, index: int) -> dict:
        """The sample of ``item`` at position ``index`` (its reason when it cannot be used)."""
        if isinstance(item, ImageLoadError):
            return {"ok": False, "index": index, "reason": str(item)}
        if self.normalized and isinstance(item, torch.Tensor):
            return {"ok": True, "index": index, "image": item.float()}
        try:
            if hasattr(item, "convert"):
                image = item.convert("RGB")
            elif isinstance(item, (torch.Tensor, np.ndarray)):
                image = pixels_to_image(item, f"image[{index}]")
            else:
                image = load_image(item, target=self.transform.needed_size)
        except ImageLoadError as exc:
            return {"ok": False, "index": index, "reason": str(exc)}
        return {"ok": True, "index": index, "image": self.transform(image)}


class ImageStreamDataset(IterableDataset):
    """Images to score from a stream (any item :class:`ImageListDataset` takes, or an ImageLoadError saying why
    there is none), in blocks of ``block`` consecutive items; samples carry their position as ``index``.

    Loader process w of W takes blocks w, w + W, …, so a DataLoader with ``batch_size=block`` yields the blocks
    in stream order, one a batch. Each process iterates ``items`` itself: it must start over when iterated
    again, give the same items each time, and be picklable (a list, or an object such as
    :class:`~elta.data.sources.Collection`).
    """

    def __init__(self, items, transform: ImageTransform, block: int) -> None:
        self.items = items
        self.block = block
        self.images = ImageListDataset([], transform)

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        rank, count = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for position, item in enumerate(self.items):
            if (position // self.block) % count == rank:
                yield self.images.sample(item, position)


def pixels_to_image(pixels: np.ndarray | torch.Tensor, name: str) -> Image.Image:
    """An RGB image from pixels: an array [H, W], [H, W, 3|4] or a tensor [3, H, W], as uint8 or floats in [0, 1]."""
    if isinstance(pixels, torch.Tensor):
        if pixels.dim() != 3 or pixels.shape[0] != 3:
            raise ImageLoadError(name, f"a tensor image must be [3, H, W]; got {list(pixels.shape)}")
        pixels = pixels.detach().cpu().permute(1, 2, 0).numpy()
    values = np.asarray(pixels)
    if values.ndim not in (2, 3) or (values.ndim == 3 and values.shape[2] not in (3, 4)):
        raise ImageLoadError(name, f"an array image must be [H, W] or [H, W, 3|4]; got shape {values.shape}")
    if values.dtype != np.uint8:
        if not np.issubdtype(values.dtype, np.floating):
            raise ImageLoadError(name, f"pixels must be uint8 or floats in [0, 1]; got {values.dtype}")
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            got = f"got {np.nanmin(values):.3g} … {np.nanmax(values):.3g}"
            fix = "for model inputs already normalised, pass normalized=True"
            raise ImageLoadError(name, f"float pixels must lie in [0, 1] ({got}); {fix}")
        values = np.round(values * 255.0).astype(np.uint8)
    return Image.fromarray(values).convert("RGB")


def collate(samples: list[dict]) -> Batch:
    """Stack the loadable samples; an empty batch when none could be loaded (failures still listed)."""
    good = [s for s in samples if s["ok"]]
    failures = [(s["index"], s["reason"]) for s in samples if not s["ok"]]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), failures=failures)
    indices = torch.tensor([s["index"] for s in good], dtype=torch.long)
    batch = Batch(torch.stack([s["image"] for s in good]), indices, failures=failures)
    for key in ("mos", "dist", "weight"):
        if key in good[0]:
            setattr(batch, key, torch.stack([s[key] for s in good]))
    return batch
