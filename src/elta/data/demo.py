"""A small, long-tailed image quality dataset in the AVA layout, built offline from real photographs.

Each image is a random crop of one of scikit-image's bundled colour photographs, degraded by one to three
distortions (blur, noise, JPEG, exposure, contrast, saturation) whose severity is a monotone function of the
image's MOS, so the score is learnable from pixels. MOS follows a long-tailed bell shape like AVA's (a scaled
Student-t with 4 degrees of freedom, mean 5.4), and each image carries 50-200 integer votes on 1..10 whose mean
is that MOS. Layout written to ``out``::

    images/<id>.jpg             RGB JPEGs, image_size x image_size, ids 1..n
    AVA.txt                     index, id, 10 vote counts, tag 1 (source photo, 1-based), tag 2 (0), challenge (0)
    train.txt val.txt test.txt  image ids, a seeded 70 / 15 / 15 split

AVA.txt is written last, once every image exists, so its presence marks a complete dataset.

``difficulty="hard"`` (:data:`DIFFICULTIES`) makes a set in AVA's regime instead of an easy one: heavier
tails, fewer and noisier raters (so the recorded MOS is itself noisy), and pixels that only partly tell the
score (a per-image "taste" offset no pixel shows, jittered severities, one distortion unrelated to the score).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from elta.errors import ConfigError, UnavailableError
from elta.progress import progress_bar
from elta.utils import atomic_write_text

__all__ = ["DIFFICULTIES", "make_demo_dataset", "demo_dataset_exists", "severity_of_mos"]

log = logging.getLogger(__name__)

MOS_CENTRE = 5.4
MOS_RANGE = (1.2, 9.8)
N_RATINGS = 10  # AVA's rating scale 1..10
# blur, noise and JPEG hide detail everywhere in a crop; one of them is always present so every image shows
# its quality in its texture, whatever its content.
STRUCTURAL = ("blur", "noise", "jpeg")
PHOTOMETRIC = ("exposure", "contrast", "saturation")
SAVE_QUALITY = 95


@dataclass(frozen=True)
class Difficulty:
    """How far the labels are from what the pixels show (see the module docstring)."""

    tail_dof: float = 4.0  # Student-t degrees of freedom of the true scores (lower: heavier tails)
    mos_scale: float = 0.57  # scale of that t distribution on the 1..10 scale
    raters: tuple[int, int] = (50, 200)  # votes per image, inclusive
    vote_sd: tuple[float, float] = (1.2, 1.5)  # spread of one image's votes
    taste_sd: float = 0.0  # per-image score offset the pixels do not show
    jitter: float = 0.05  # relative jitter of each distortion's severity
    nuisance: bool = False  # one extra distortion of random severity, unrelated to the score


DIFFICULTIES = {
    "standard": Difficulty(),
    "hard": Difficulty(3.0, 0.75, (10, 60), (1.5, 2.0), taste_sd=0.8, jitter=0.3, nuisance=True),
}


def demo_dataset_exists(out: str | Path) -> bool:
    """True when ``out`` holds a completely written demo dataset (its AVA.txt)."""
    return (Path(out) / "AVA.txt").is_file()


def severity_of_mos(mos: np.ndarray | float) -> np.ndarray:
    """Distortion severity in [0, 1] for a MOS on 1..10: ~0.87 at MOS 4, 0.63 at 5, 0.31 at 6, 0.11 at 7.

    Steepest around the centre of the score distribution, where most images lie, and saturating in the tails.
    """
    return 0.5 * (1.0 + np.tanh((MOS_CENTRE - np.asarray(mos, dtype=float)) / 1.5))


def _source_photos() -> list[Image.Image]:
    """scikit-image's bundled colour photographs (shipped with the package: no download)."""
    try:
        from skimage import data
    except ImportError as exc:
        raise UnavailableError(
            "the demo dataset needs scikit-image: pip install scikit-image "
            "(or, in the elta checkout, pip install -e '.[demo]')"
        ) from exc
    arrays = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.stereo_motorcycle()[0]]
    return [Image.fromarray(a[..., :3]).convert("RGB") for a in arrays]


def _vote_probabilities(mos: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Discretised Gaussians over ratings 1..10, [n, 10], whose centre is solved so that the mean is ``mos``.

    Clipping at 1 and 10 pulls a tail distribution's mean inwards; bisection on the centre compensates.
    """
    ratings = np.arange(1, N_RATINGS + 1)
    lo, hi = np.full_like(mos, -30.0), np.full_like(mos, 40.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        p = np.exp(-0.5 * ((ratings[None, :] - mid[:, None]) / sd[:, None]) ** 2)
        mean = (p * ratings).sum(1) / p.sum(1)
        below = mean < mos
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    p = np.exp(-0.5 * ((ratings[None, :] - ((lo + hi) / 2)[:, None]) / sd[:, None]) ** 2)
    return p / p.sum(1, keepdims=True)


def _vote_counts(rng: np.random.Generator, mos: np.ndarray, level: Difficulty) -> np.ndarray:
    """Vote counts [n, 10] from (standard) 50-200 raters per image, each an integer on 1..10 around the target.

    Raters are drawn by systematic (stratified) sampling of the vote distribution: every vote keeps its
    marginal distribution, and the mean of the votes stays within a few hundredths of the target.
    """
    n = len(mos)
    raters = rng.integers(level.raters[0], level.raters[1] + 1, size=n)
    probs = _vote_probabilities(mos, rng.uniform(*level.vote_sd, size=n))
    counts = np.zeros((n, N_RATINGS), dtype=np.int64)
    for i in range(n):
        u = (np.arange(raters[i]) + rng.random()) / raters[i]
        votes = np.searchsorted(np.cumsum(probs[i]), u, side="right").clip(0, N_RATINGS - 1)
        counts[i] = np.bincount(votes, minlength=N_RATINGS)
    return counts


def _distort(
    img: Image.Image, name: str, severity: float, direction: int, rng: np.random.Generator
) -> Image.Image:
    """Apply one distortion at ``severity`` in [0, 1]; pixel sizes are for a 256-px image and scale with it."""
    scale = img.width / 256
    if name == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=3.5 * severity * scale))
    if name == "noise":
        noise = rng.standard_normal((img.height, img.width, 3), dtype=np.float32) * (40.0 * severity)
        return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    if name == "jpeg":
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=int(round(75 * (4 / 75) ** severity)))
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")
    if name == "exposure":
        gain = 2.0 ** (1.5 * severity * direction)
        return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) * gain, 0, 255).astype(np.uint8))
    if name == "contrast":
        return ImageEnhance.Contrast(img).enhance(1.0 - 0.7 * severity)
    if name == "saturation":
        factor = 1.0 + 1.6 * severity if direction > 0 else 1.0 - 0.9 * severity
        return ImageEnhance.Color(img).enhance(factor)
    raise ValueError(f"unknown distortion {name!r}")


def _image(
    rng: np.random.Generator, photo: Image.Image, severity: float, size: int, level: Difficulty
) -> Image.Image:
    """A random square crop of ``photo``, resized to ``size``, maybe flipped, distorted at ``severity``."""
    short = min(photo.size)
    # a crop much smaller than the output would be upsampled, adding blur unrelated to the score
    low = min(1.0, max(0.4, 0.8 * size / short))
    side = int(round(rng.uniform(low, 1.0) * short))
    x, y = int(rng.integers(0, photo.width - side + 1)), int(rng.integers(0, photo.height - side + 1))
    extra = int(rng.choice(3, p=[0.4, 0.4, 0.2]))
    primary = str(rng.choice(STRUCTURAL))
    others = [d for d in STRUCTURAL + PHOTOMETRIC if d != primary]
    names = [primary, *(str(d) for d in rng.choice(others, size=extra, replace=False))]
    order = PHOTOMETRIC + STRUCTURAL  # camera-like order: tone first, then optics, sensor noise, compression
    names.sort(key=order.index)
    jitter = (1.0 - level.jitter, 1.0 + level.jitter)
    # (name, severity in [0, 1], direction +1 / -1)
    distortions = [
        (name, float(np.clip(severity * rng.uniform(*jitter), 0.0, 1.0)), int(rng.choice([-1, 1])))
        for name in names
    ]
    if level.nuisance:  # a distortion whose strength says nothing about the score
        name = str(rng.choice([d for d in PHOTOMETRIC if d not in names]))
        distortions.insert(0, (name, float(rng.uniform(0.0, 0.6)), int(rng.choice([-1, 1]))))
    flip = rng.random() < 0.5
    img = photo.resize((size, size), Image.Resampling.LANCZOS, box=(x, y, x + side, y + side))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for name, strength, direction in distortions:
        img = _distort(img, name, strength, direction, rng)
    return img


def _split_ids(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """A 70 / 15 / 15 split of ids 1..n, each part sorted."""
    ids = rng.permutation(n) + 1
    n_train, n_val = int(round(0.7 * n)), int(round(0.15 * n))
    parts = {"train": ids[:n_train], "val": ids[n_train : n_train + n_val], "test": ids[n_train + n_val :]}
    return {name: np.sort(part) for name, part in parts.items()}


def make_demo_dataset(
    out: str | Path,
    n: int = 1500,
    seed: int = 0,
    image_size: int = 256,
    progress: bool = False,
    difficulty: str = "standard",
) -> Path:
    """Build the demo dataset of ``n`` images into ``out`` (AVA layout) and return the path of its AVA.txt.

    Deterministic: the same ``seed``, ``n``, ``image_size`` and ``difficulty`` give the same files, byte for byte.
    """
    if n < 3:
        raise ConfigError(f"--n {n}: the demo dataset needs at least 3 images (one per split)")
    if difficulty not in DIFFICULTIES:
        raise ConfigError(f"--difficulty {difficulty}: choose one of {', '.join(DIFFICULTIES)}")
    level = DIFFICULTIES[difficulty]
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    (out / "AVA.txt").unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    for path in images.glob("*.jpg"):  # left by an earlier, larger build into the same folder
        if path.stem.isdigit() and int(path.stem) > n:
            path.unlink()

    rng = np.random.default_rng(seed)
    photos = _source_photos()
    weights = 0.6 ** np.arange(len(photos))  # long-tailed content groups: the last photo is a minority group
    sources = rng.choice(len(photos), size=n, p=weights / weights.sum())
    target = np.clip(MOS_CENTRE + level.mos_scale * rng.standard_t(level.tail_dof, size=n), *MOS_RANGE)
    counts = _vote_counts(rng, target, level)  # votes around long-tailed target scores
    mos = (counts * np.arange(1, N_RATINGS + 1)).sum(1) / counts.sum(1)
    # standard: from the recorded MOS, so label and pixels agree exactly; hard: a taste the pixels do not show
    taste = np.random.default_rng([seed, 1]).normal(0.0, level.taste_sd, n) if level.taste_sd else 0.0
    severity = severity_of_mos(mos + taste)
    splits = _split_ids(rng, n)

    image_rngs = progress_bar(rng.spawn(n), desc="demo images", unit="img", enabled=progress)
    for i, image_rng in enumerate(image_rngs):
        img = _image(image_rng, photos[sources[i]], float(severity[i]), image_size, level)
        img.save(images / f"{i + 1}.jpg", format="JPEG", quality=SAVE_QUALITY)

    for name, ids in splits.items():
        atomic_write_text(out / f"{name}.txt", "".join(f"{i}\n" for i in ids))
    rows = [[i + 1, i + 1, *counts[i].tolist(), int(sources[i]) + 1, 0, 0] for i in range(n)]
    atomic_write_text(out / "AVA.txt", "".join(" ".join(map(str, row)) + "\n" for row in rows))
    log.info("demo dataset: %d images in %s, MOS mean %.2f sd %.2f", n, out, mos.mean(), mos.std())
    return out / "AVA.txt"
