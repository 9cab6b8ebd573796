"""Pieces the benchmark scripts share: test photos, a random training batch, timing, the machine."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from elta.data.dataset import Batch
from elta.models import build_model

COLOUR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle")


def make_photos(
    folder: Path,
    n: int,
    size: tuple[int, int],
    *,
    sources: Sequence[str] = COLOUR_PHOTOS,
    flip: bool = False,
    scores: bool = False,
) -> list[tuple[Path, float]]:
    """``n`` JPEGs (quality 90) of ``size``, random crops of scikit-image's photos named in ``sources``.

    With ``flip`` half are mirrored; with ``scores`` each gets a random MOS in [1, 10] (else NaN).
    Returns (path, MOS) per photo.
    """
    from skimage import data

    photos = []
    for name in sources:
        array = getattr(data, name)()
        photos.append(array[0] if isinstance(array, tuple) else array)  # stereo pairs: the left image
    rng = np.random.default_rng(0)
    made = []
    for i in range(n):
        photo = Image.fromarray(photos[i % len(photos)])
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = photo.crop((left, top, left + cw, top + ch)).resize(size, Image.Resampling.BICUBIC)
        if flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"{i:04d}.jpg"
        image.save(path, quality=90)
        made.append((path, float(rng.uniform(1, 10)) if scores else float("nan")))
    return made


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark script's argument parser, its module docstring as the help text."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def ava_model(backbone: str, image_size: int):
    """A distribution model over AVA's 10 rating bins, untrained (timings do not depend on the weights)."""
    return build_model(
        backbone, "distribution", list(range(1, 11)), [1, 10], image_size=image_size, weights="none"
    )


def alternated(
    device: torch.device, fns: dict[str, Callable[[], object]], rounds: int
) -> dict[str, list[float]]:
    """Seconds of each of ``fns`` per round; the order rotates every round, so none always follows the same one."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(device, fns[name]))
    return times


def add_photo_arguments(parser: argparse.ArgumentParser) -> None:
    """--images, --width, --height: the test photos of :func:`make_photos`."""
    parser.add_argument("--images", type=int, default=200, help="number of test JPEGs")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)


def random_batch(b: int, size: int, device: torch.device) -> Batch:
    """A training batch of random images [b, 3, size, size] with 10-bin vote distributions."""
    dist = torch.softmax(torch.randn(b, 10), 1).to(device)
    images, mos = torch.randn(b, 3, size, size, device=device), dist @ torch.arange(1.0, 11.0, device=device)
    return Batch(
        images=images, indices=torch.arange(b), mos=mos, dist=dist, weight=torch.ones(b, device=device)
    )


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` takes, the GPU's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def machine(device: torch.device) -> str:
    """The CPU model, core count, torch version and threads, and the GPU on CUDA."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    text = (
        f"CPU {cpu}, {os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text
