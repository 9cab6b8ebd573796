"""Where and how work runs: device, precision, batch size, loader processes, progress; resolved once.

A :class:`Runtime` is built once per command (from the config's ``runtime`` section, or by hand) and passed to the
engine; nothing below it chooses a device or a worker count on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from elta.data.dataset import collate
from elta.engine.distributed import SINGLE, Processes
from elta.engine.precision import Precision
from elta.errors import ConfigError, UnavailableError
from elta.launch import local_world_size

__all__ = ["Runtime", "resolve_device"]

# Below this many items, starting loader processes costs more than it saves.
SMALL_JOB = 64


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; anything else is passed to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnavailableError(
            f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)"
        )
    return device


@dataclass(frozen=True)
class Runtime:
    """The resolved settings every engine call runs with.

    ``workers`` None means the one policy of :meth:`loader_workers`. ``processes`` is this process's place in a
    torchrun job (a single process by default).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: Precision | None = None  # None: float32 on ``device``
    batch_size: int = 32
    workers: int | None = None
    progress: bool = False
    compile: bool = False
    processes: Processes = SINGLE

    def __post_init__(self) -> None:
        if self.precision is None:
            object.__setattr__(self, "precision", Precision(self.device))
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be ≥ 1; got {self.batch_size}")

    @classmethod
    def create(
        cls,
        device: str | torch.device = "auto",
        *,
        amp: str = "auto",
        channels_last: bool = False,
        batch_size: int = 32,
        workers: int | None = None,
        progress: bool = False,
        compile: bool = False,
        processes: Processes = SINGLE,
    ) -> Runtime:
        """Resolve ``device`` (auto | cpu | cuda[:N] | mps) and ``amp`` (auto | bf16 | fp16 | off)."""
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        precision = Precision.create(amp, dev, channels_last)
        return cls(dev, precision, batch_size, workers, progress, compile, processes)

    @classmethod
    def from_config(cls, cfg: Any, *, progress: bool = False, **overrides: Any) -> Runtime:
        """From a config's ``runtime`` section (device, amp, channels_last, batch_size, workers, compile)."""
        keys = ("device", "amp", "channels_last", "batch_size", "workers", "compile")
        values = {key: getattr(cfg, key) for key in keys if hasattr(cfg, key)}
        return cls.create(**{**values, "progress": progress, **overrides})

    def loader_workers(self, n_items: int | None = None) -> int:
        """Loader processes: the configured number, else the one policy.

        Small jobs load in the main process. Beside a model on the CPU, none on small machines (they would
        compete with it) and up to 4 on larger ones; beside a GPU, up to 8. The machine's CPUs are shared
        among the processes torchrun started on it.
        """
        if self.workers is not None:
            return self.workers
        if n_items is not None and n_items < SMALL_JOB:
            return 0
        cpus = max(1, (os.cpu_count() or 1) // local_world_size())
        if self.device.type == "cpu":
            return 0 if cpus <= 2 else min(4, cpus // 2)
        return min(8, cpus)

    def loader(self, dataset: Dataset, *, persistent: bool = False, **kwargs: Any) -> DataLoader:
        """A loader of :class:`~elta.data.dataset.Batch` (of ``batch_size``, unless a ``batch_sampler`` is
        given); with ``persistent`` its workers outlive an epoch."""
        workers = self.loader_workers(len(dataset) if hasattr(dataset, "__len__") else None)
        batch_size = 1 if "batch_sampler" in kwargs else self.batch_size
        options = {"collate_fn": collate, "num_workers": workers, "pin_memory": self.device.type == "cuda"}
        return DataLoader(
            dataset, batch_size, persistent_workers=persistent and workers > 0, **options, **kwargs
        )
