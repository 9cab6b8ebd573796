"""Where a launcher such as torchrun placed this process, from the variables it sets (no torch import)."""

from __future__ import annotations

import os

__all__ = ["world_size", "rank", "local_rank", "local_world_size", "launched_by_torchrun"]


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def world_size() -> int:
    """Processes in the run (WORLD_SIZE); 1 outside a launcher."""
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank (RANK); 0 writes the run's files and prints."""
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its machine (LOCAL_RANK): the GPU it takes."""
    return _env_int("LOCAL_RANK", 0)


def local_world_size() -> int:
    """Processes on this machine (LOCAL_WORLD_SIZE), which share its CPUs."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1))


def launched_by_torchrun() -> bool:
    """True in a process of a multi-process run (WORLD_SIZE > 1)."""
    return world_size() > 1
