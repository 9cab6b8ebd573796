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
from elta.engine.distributed import SINGLE, Processes
from elta.launch import local_world_size
from elta.models.model import AestheticModel, ModelOutput

__all__ = ["Predictions", "run_inference", "map_batches", "default_workers", "make_loader"]


def default_workers(device: torch.device) -> int:
    """Loader processes: none on small CPU machines (they would compete with the model), else up to 8.

    The machine's CPUs are shared among the training processes torchrun started on it.
    """
    cpus = max(1, (os.cpu_count() or 1) // local_world_size())
    if device.type == "cpu":
        return 0 if cpus <= 2 else min(4, cpus // 2)
    return min(8, cpus)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    persistent: bool = False,
    **kwargs,
) -> DataLoader:
    """A loader of :class:`~elta.data.dataset.Batch`; with ``persistent`` its workers outlive an epoch."""
    return DataLoader(
        dataset,
        batch_size=batch_size if "batch_sampler" not in kwargs else 1,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0,
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
    processes: Processes = SINGLE,
) -> Predictions:
    """Score every item of ``dataset`` (which yields the samples of :mod:`elta.data.dataset`).

    ``forward`` replaces ``model(inputs)``, e.g. the head alone on cached backbone features. In a
    distributed run (``processes``) each process scores a contiguous shard and every process receives
    all predictions: each item scored exactly once.
    """
    if processes.distributed:
        return _run_sharded(model, dataset, processes, batch_size, device, workers, progress, desc, forward)
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


class _Shard(Dataset):
    """Items ``rows`` of a dataset, numbered 0..len(rows)−1 (samples carry their position as ``index``)."""

    def __init__(self, dataset: Dataset, rows: list[int]) -> None:
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict:
        return {**self.dataset[self.rows[position]], "index": position}


def _run_sharded(model, dataset, processes, batch_size, device, workers, progress, desc, forward):
    n = len(dataset)
    own = processes.share(range(n))
    part = run_inference(
        model,
        _Shard(dataset, own),
        batch_size=batch_size,
        device=device,
        workers=workers,
        progress=progress and processes.is_main,
        desc=desc,
        forward=forward,
    )
    shards = processes.gather_objects((own, part))
    order = np.concatenate([np.asarray(rows, dtype=np.int64) for rows, _ in shards])
    if not np.array_equal(np.sort(order), np.arange(n)):
        raise RuntimeError(f"{desc}: the processes' shards do not cover the {n} items exactly once")
    score = np.empty(n)
    std = np.empty(n)
    dist = np.empty((n, model.spec.num_bins)) if part.dist is not None else None
    errors = [""] * n
    for rows, shard in shards:
        score[rows], std[rows] = shard.score, shard.std
        if dist is not None:
            dist[rows] = shard.dist
        for row, error in zip(rows, shard.errors, strict=True):
            errors[row] = error
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
