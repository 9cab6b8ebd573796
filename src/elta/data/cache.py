"""Image cache: every image of a dataset decoded once, resized, and stored for fast training reads.

``elta data cache`` writes CACHE/<relative image path> for every image below the dataset's image root, so
CACHE is an image folder with the layout of the original: ``--images CACHE`` then works unchanged in
training, evaluation, checks and prediction (every reader joins the root with the image's relative path).
Each cached file is a plain image in the format its name says (JPEG at ``quality`` for .jpg / .jpeg),
already resized: square ``size`` × ``size`` (the paper's Resize((300, 300)), after which the training
transform's resize is a no-op) or shorter side = ``size`` with the aspect kept (never enlarged).

Next to the images: ``elta_cache.json`` (the marker: settings, counts, whether the build completed),
``index.csv`` (image, source bytes and mtime, source and cached width and height; a rebuild with the same
settings skips sources that have not changed) and ``bad_images.csv`` (sources that could not be decoded,
in the format of ``elta data check``'s problem list).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from elta.data.annotations import Annotations
from elta.data.check import write_problems
from elta.data.images import ImageLoadError, load_image
from elta.errors import CacheError, ConfigError
from elta.progress import progress_bar
from elta.utils import atomic_write_text

__all__ = ["CACHE_MARKER", "CacheInfo", "build_cache", "read_cache_info", "check_cache_fits"]

log = logging.getLogger(__name__)

CACHE_MARKER = "elta_cache.json"
KIND = "elta-image-cache"
MODES = ("square", "short")
_SIZES = ("source_width", "source_height", "width", "height")  # px of the source and of the cached file
INDEX_COLUMNS = ("image", "source_bytes", "source_mtime_ns", *_SIZES)
# by the cached file's extension; anything else is stored as PNG
_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}
_FORMATS |= {".tif": "TIFF", ".tiff": "TIFF"}


@dataclass
class CacheInfo:
    """The settings and state of a cache folder, as stored in its ``elta_cache.json``."""

    size: int  # px: the square side, or the shorter side
    mode: str  # square | short
    quality: int  # JPEG / WebP quality of the cached files
    source_root: str  # the image root the cache was built from
    complete: bool = False  # False while building, or when a build was interrupted
    images: int = 0  # images cached
    bad: int = 0  # sources that could not be decoded (bad_images.csv)
    kind: str = KIND
    version: int = 1

    def same_settings(self, other: CacheInfo) -> bool:
        return (self.size, self.mode, self.quality) == (other.size, other.mode, other.quality)


def read_cache_info(root: str | Path) -> CacheInfo | None:
    """The cache marker of folder ``root``, or None when ``root`` is not a cache."""
    marker = Path(root) / CACHE_MARKER
    if not marker.is_file():
        return None
    try:
        info = CacheInfo(**json.loads(marker.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise CacheError(
            f"{marker}: not a readable elta cache marker ({exc}); rebuild the cache with `elta data cache`"
        ) from exc
    if info.kind != KIND:
        raise CacheError(
            f"{marker}: kind {info.kind!r}, expected {KIND!r}; rebuild it with `elta data cache`"
        )
    return info


def check_cache_fits(root: str | Path, needed: int) -> CacheInfo | None:
    """Log what a run reads when its image root is a cache, and warn when the cache cannot serve it.

    ``needed`` (px) is the smallest side the run's transform uses (resize for training, image_size for
    evaluation); a smaller cache would be upsampled. Returns the cache's info, or None for a plain folder.
    """
    info = read_cache_info(root)
    if info is None:
        return None
    log.info(
        "reading images from the cache %s (%s, %d px, from %s)", root, info.mode, info.size, info.source_root
    )
    if not info.complete:
        log.warning("%s: the cache build did not finish; rerun `elta data cache` with the same --out", root)
    if info.size < needed:
        message = "%s holds %d px images but this run needs %d px: they are upsampled. Rebuild it with "
        message += "`elta data cache --size %d`, or train from the original images"
        log.warning(message, root, info.size, needed, needed)
    return info


def _resized(image: Image.Image, size: int, mode: str) -> Image.Image:
    """Square ``size`` × ``size``, or shorter side ``size`` with the aspect kept (never enlarged); bicubic."""
    width, height = image.size
    if mode == "square":
        new = (size, size)
    else:
        scale = size / min(width, height)
        if scale >= 1.0:
            return image
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image if new == image.size else image.resize(new, Image.Resampling.BICUBIC)


def _cache_one(job: tuple[str, str, int, str, int]) -> dict:
    """Decode ``source``, resize, write ``target``; a dict for index.csv, or ``{"reason": …}`` when unreadable."""
    source, target, size, mode, quality = job
    try:
        image = load_image(source)
    except ImageLoadError as exc:
        Path(target).unlink(missing_ok=True)  # an earlier build's copy of a source that no longer decodes
        return {"reason": f"unreadable image: {exc.reason}"}
    small = _resized(image, size, mode)
    out = Path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = _FORMATS.get(out.suffix.lower(), "PNG")
    options = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    small.save(out, format=fmt, **options)
    return dict(zip(_SIZES, (*image.size, *small.size), strict=True))


def _reusable(out: Path, info: CacheInfo) -> dict[str, dict]:
    """index.csv rows of an earlier complete build with the same settings, by image; else empty."""
    old = read_cache_info(out)
    index = out / "index.csv"
    if old is None or not old.complete or not old.same_settings(info) or not index.is_file():
        return {}
    frame = pd.read_csv(index, keep_default_na=False, dtype={"image": str})
    return {row["image"]: row for row in frame.to_dict("records")}


def _write_marker(out: Path, info: CacheInfo) -> None:
    raw = asdict(info)
    ordered = {"kind": raw.pop("kind"), "version": raw.pop("version"), **raw}
    atomic_write_text(out / CACHE_MARKER, json.dumps(ordered, indent=1) + "\n")


def _check_out(out: Path, root: Path) -> None:
    if read_cache_info(root) is not None:
        raise CacheError(f"{root} is already an elta cache; build the cache from the original images")
    if out.resolve() == root.resolve():
        raise ConfigError(f"--out {out} is the image folder itself; choose a new folder for the cache")
    if out.is_dir() and any(out.iterdir()) and not (out / CACHE_MARKER).is_file():
        raise ConfigError(
            f"--out {out} exists and is not an elta cache (no {CACHE_MARKER}); choose a new or empty folder"
        )


def _plan(
    df: pd.DataFrame, root: Path, out: Path, reusable: dict[str, dict], settings: tuple[int, str, int]
) -> tuple[list[dict], list[dict], list[tuple]]:
    """Split the table's images into reused index rows, problems, and jobs (index entry, problem, work)."""
    rows = df.drop_duplicates("path")[["source", "row", "image_id", "path"]]
    index, problems, jobs = [], [], []
    for source, line, image_id, path in rows.itertuples(index=False, name=None):
        rel = os.path.relpath(path, root)
        problem = {"file": str(source), "row": int(line), "image_id": str(image_id), "path": str(path)}
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            problems.append({**problem, "reason": f"not below the image root {root}"})
            continue
        try:
            stat = os.stat(path)
        except OSError:
            (out / rel).unlink(missing_ok=True)
            problems.append({**problem, "reason": f"image not found: {path}"})
            continue
        key = Path(rel).as_posix()
        entry = {"image": key, "source_bytes": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}
        old = reusable.get(key, {})
        same = (old.get("source_bytes"), old.get("source_mtime_ns")) == (stat.st_size, stat.st_mtime_ns)
        if same and (out / rel).is_file():
            index.append({**entry, **{k: old[k] for k in _SIZES}})
        else:
            jobs.append((entry, problem, (str(path), str(out / rel), *settings)))
    return index, problems, jobs


def build_cache(
    annotations: Annotations,
    out: str | Path,
    size: int = 300,
    mode: str = "square",
    quality: int = 95,
    progress: bool = False,
    *,
    workers: int = 0,
) -> dict:
    """Decode and resize every image of ``annotations`` (what ``read_annotations`` returns; all splits) once
    into folder ``out``, at their paths relative to ``annotations.info.images_root``.

    ``workers`` > 0 decodes in that many processes. Unreadable sources are listed in ``out/bad_images.csv``,
    never fatal. Returns a summary: cache, images, written, reused, bad, bad_list (path or None), bytes
    (cached files), size, mode, quality.
    """
    if mode not in MODES:
        raise ConfigError(f"cache mode must be one of {', '.join(MODES)}; got {mode!r}")
    if size < 1:
        raise ConfigError(f"cache size must be ≥ 1 px; got {size}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"cache quality must be in 1..100; got {quality}")
    df, root = annotations.frame, Path(annotations.info.images_root).absolute()
    out = Path(out).absolute()
    _check_out(out, root)
    info = CacheInfo(size=size, mode=mode, quality=quality, source_root=str(root))
    reusable = _reusable(out, info)
    out.mkdir(parents=True, exist_ok=True)
    _write_marker(out, info)  # complete=False until the end

    index, problems, jobs = _plan(df, root, out, reusable, (size, mode, quality))
    reused = len(index)

    bar = progress_bar(desc="caching images", total=len(jobs), unit="img", enabled=progress)
    work = [job for _, _, job in jobs]
    parallel = workers > 0 and len(jobs) > 1
    with ProcessPoolExecutor(max_workers=workers) if parallel else nullcontext() as pool:
        results = pool.map(_cache_one, work, chunksize=16) if parallel else map(_cache_one, work)
        for (entry, problem, _job), result in zip(jobs, results, strict=True):
            if "reason" in result:
                problems.append({**problem, "reason": result["reason"]})
            else:
                index.append({**entry, **result})
            bar.update()
    bar.close()

    table = pd.DataFrame(index, columns=list(INDEX_COLUMNS)).sort_values("image")
    atomic_write_text(out / "index.csv", table.to_csv(index=False))
    bad_list = out / "bad_images.csv"
    if problems:
        write_problems(problems, bad_list)
        log.warning("%d images could not be cached; listed in %s", len(problems), bad_list)
    else:
        bad_list.unlink(missing_ok=True)
    info.complete, info.images, info.bad = True, len(table), len(problems)
    _write_marker(out, info)
    summary = dict(
        cache=str(out), images=len(table), written=len(table) - reused, reused=reused, bad=len(problems)
    )
    summary["bad_list"] = str(bad_list) if problems else None
    summary["bytes"] = int(sum((out / name).stat().st_size for name in table["image"]))
    return summary | dict(size=size, mode=mode, quality=quality)
