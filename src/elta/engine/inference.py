"""Batched forward passes over a dataset, collecting scores and distributions on the host."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from elta.data.dataset import collate
from elta.models.model import AestheticModel, ModelOutput

__all__ = ["Predictions", "run_inference", "map_batches", "default_workers", "make_loader"]


def default_workers(device: torch.device) -> int:
    """Loader processes: none on small CPU machines (they would compete with the model), else up to 8."""
    cpus = os.cpu_count() or 1
    if device.type == "cpu":
        return 0 if cpus <= 2 else min(4, cpus // 2)
    return min(8, cpus)


def make_loader(
    dataset: Dataset, batch_size: int, workers: int, device: torch.device, **kwargs
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size if "batch_sampler" not in kwargs else 1,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        **kwargs,
    )


@dataclass
class Predictions:
    """Per-item results in dataset order; rows whose image failed hold NaN and their reason."""

    score: np.ndarray  # [N]
    std: np.ndarray  # [N], NaN for a scalar head
    dist: np.ndarray | None  # [N, K]
    errors: list[str]  # "" where the item was scored

    @property
    def ok(self) -> np.ndarray:
        return np.array([e == "" for e in self.errors], dtype=bool)


@torch.no_grad()
def run_inference(
    model: AestheticModel,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    workers: int | None = None,
    progress: bool = False,
    desc: str = "scoring",
    forward: Callable[[torch.Tensor], ModelOutput] | None = None,
) -> Predictions:
    """Score every item of ``dataset`` (which yields the samples of :mod:`elta.data.dataset`).

    ``forward`` replaces ``model(inputs)``, e.g. the head alone on cached backbone features.
    """
    forward = forward or model
    n = len(dataset)
    k = model.spec.num_bins
    score = np.full(n, np.nan, dtype=np.float64)
    std = np.full(n, np.nan, dtype=np.float64)
    dist = np.full((n, k), np.nan, dtype=np.float64) if k else None
    model.eval()
    errors = [""] * n
    for idx, out in map_batches(
        dataset,
        forward,
        errors,
        batch_size=batch_size,
        device=device,
        workers=workers,
        progress=progress,
        desc=desc,
    ):
        score[idx] = out.score.double().cpu().numpy()
        if out.distribution is not None:
            dist[idx] = out.distribution.double().cpu().numpy()
            std[idx] = out.score_std(model.centers).double().cpu().numpy()
    return Predictions(score=score, std=std, dist=dist, errors=errors)


@torch.no_grad()
def map_batches(
    dataset: Dataset,
    forward: Callable[[torch.Tensor], object],
    errors: list[str],
    *,
    batch_size: int,
    device: torch.device | str,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> Iterator[tuple[np.ndarray, object]]:
    """Yield (dataset indices, ``forward(inputs)``) batch by batch, without gradients.

    Items that cannot be loaded are skipped; their reason is written into ``errors[index]``.
    """
    device = torch.device(device)
    workers = default_workers(device) if workers is None else workers
    loader = make_loader(dataset, batch_size, workers, device, shuffle=False)
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        for index, reason in batch.failures:
            errors[index] = reason
        if len(batch):
            yield batch.indices.numpy(), forward(batch.images.to(device, non_blocking=True))
