"""Image loading, image lists and image-path safety.

`load_image` is the one way the project decodes a photo: it returns a fully decoded 8-bit RGB image with the
EXIF orientation applied, whatever the file's mode, and refuses oversized images before decoding them.
Given the side length the caller needs (`target`), a JPEG at least twice that size is decoded at a reduced
scale by libjpeg (draft mode), which is several times faster and never smaller than `target`.
"""

from __future__ import annotations

import io
import logging
import ntpath
import os
import posixpath
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from elta.errors import AnnotationError, ConfigError, ImageLoadError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "LIST_SUFFIXES",
    "list_images",
    "load_image",
    "read_image_size",
    "resolve_image_path",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".avif", ".heic", ".heif"}
)
HEIF_EXTENSIONS = frozenset({".heic", ".heif"})  # decoded through the optional pillow-heif package
DEFAULT_MAX_PIXELS = 100_000_000
LIST_SUFFIXES = frozenset({".txt", ".lst"})

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})  # 16/32-bit integer or float
_DRIVE = re.compile(r"[A-Za-z]:")


def _check_size(path: str | Path, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageLoadError(
            path,
            f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}; "
            "downscale the file or raise max_pixels",
        )


def _open_error(path: str | Path, err: Exception) -> ImageLoadError:
    """Translate what PIL raises on open/decode into an ImageLoadError with a readable reason."""
    if isinstance(err, FileNotFoundError):
        return ImageLoadError(path, "file not found")
    if isinstance(err, UnidentifiedImageError):
        return ImageLoadError(path, "not a recognised image file")
    if isinstance(err, Image.DecompressionBombError):
        return ImageLoadError(path, f"too large to decode safely ({err})")
    return ImageLoadError(path, f"corrupt or truncated image ({type(err).__name__}: {err})")


_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@contextmanager
def _opened(source: Path | bytes, name: str | Path) -> Iterator[Image.Image]:
    """``Image.open`` of an existing file or of encoded bytes; whatever PIL raises in the block becomes an
    ImageLoadError naming ``name``. PIL's DecompressionBombWarning is silenced: callers apply their own
    ``max_pixels`` check, and PIL's hard limit still raises and is translated."""
    if isinstance(source, Path) and not source.is_file():
        raise ImageLoadError(name, "file not found" if not source.exists() else "not a file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
                yield img
        except _PIL_ERRORS as err:
            raise _open_error(name, err) from err


def read_image_size(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) in pixels from the file header only, without decoding; ImageLoadError when unusable."""
    path = Path(path)
    with _opened(path, path) as img:
        _check_size(path, img.size, max_pixels)
        return img.size


def _grey_to_uint8(img: Image.Image) -> np.ndarray:
    """16/32-bit integer or float greyscale to uint8 (H, W): integers 0..65535 or floats in [0, 1] map
    linearly onto 0..255; other values have no natural scale and are stretched min..max (non-finite floats
    count as 0)."""
    values = np.asarray(img, dtype=np.float64)
    full = 1.0 if img.mode == "F" else 65535.0
    if img.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, full)
    if lo >= 0.0 and hi <= full:
        return np.round(values * (255.0 / full)).astype(np.uint8)
    if hi == lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_rgb(img: Image.Image, path: str | Path) -> Image.Image:
    """Any PIL mode as 8-bit RGB; transparency is composited onto white."""
    if "transparency" in img.info and img.mode in {"P", "L", "RGB"}:
        img = img.convert("RGBA")
    if img.mode == "RGB":
        return img
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in _GREY_MODES:
        return Image.fromarray(_grey_to_uint8(img)).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as err:
        raise ImageLoadError(path, f"unsupported image mode {img.mode!r} ({err})") from err


def load_image(
    source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, target: int | None = None
) -> Image.Image:
    """Decode an image file (or its encoded bytes, e.g. an upload) to 8-bit RGB, EXIF orientation applied.

    Images larger than `max_pixels` (width * height) are refused before decoding. Every failure (missing
    file, not an image, truncated or corrupt data, too large) raises ImageLoadError naming the path.
    `target` (px) is the smallest side the caller needs: a JPEG whose shorter side is ≥ 2 × `target` may
    come back reduced by 2, 4 or 8, never below `target` on either side; None decodes at full size.
    """
    source = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source)
    name = source if isinstance(source, Path) else f"<{len(source)} bytes>"
    if target is not None and target < 1:
        raise ValueError(f"load_image({name}): target must be ≥ 1 pixel or None; got {target}")
    if isinstance(source, Path) and source.suffix.lower() in HEIF_EXTENSIONS and not _heif_opener():
        raise ImageLoadError(name, "HEIC/HEIF images need the pillow-heif package: pip install pillow-heif")
    with _opened(source, name) as img:
        _check_size(name, img.size, max_pixels)
        if target is not None and img.format == "JPEG" and min(img.size) >= 2 * target:
            img.draft("RGB", (target, target))  # libjpeg's DCT scaling by 1/2, 1/4 or 1/8, sides ≥ target
        img.load()
        try:
            upright = ImageOps.exif_transpose(img)  # a copy, turned as the EXIF orientation says
        except (OSError, SyntaxError, ValueError, KeyError, TypeError) as err:  # malformed EXIF block
            logger.warning("%s: EXIF orientation ignored (%s)", name, err)
            upright = img.copy()  # the stored pixels
        return _to_rgb(upright, name)


def resolve_image_path(root: str | Path, image_id: str) -> Path:
    """`root / image_id`, refusing ids that are empty, absolute or lead outside `root` (checked lexically).

    Both "/" and "\\" count as separators, so an id that would escape on Windows is refused everywhere.
    """
    if not isinstance(image_id, str) or not image_id.strip():
        raise AnnotationError(f"image id {image_id!r} is empty; every row needs an image file name")
    if "\x00" in image_id:
        raise AnnotationError(f"image id {image_id!r} contains a NUL character")
    if image_id[0] in "/\\" or _DRIVE.match(image_id):
        raise AnnotationError(
            f"image id {image_id!r} is an absolute path; use a path relative to the image folder"
        )
    if not image_id.strip("./\\"):
        raise AnnotationError(f"image id {image_id!r} names the image folder itself, not a file")
    if ".." in image_id:
        for flavour in (posixpath, ntpath):
            normal = flavour.normpath(image_id)
            if normal == "." or normal.split(flavour.sep, 1)[0] == "..":
                raise AnnotationError(
                    f"image id {image_id!r} points outside the image folder (.. components)"
                )
        image_id = os.path.normpath(image_id)
    return Path(root) / image_id


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _images_below(folder: Path) -> list[Path]:
    """Image files below `folder`, recursively, sorted; hidden files and folders (".name") are left out, and
    the number of other files left out is logged by suffix."""
    found, others = [], Counter()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath)
        for name in filenames:
            if name.startswith("."):
                continue
            if _is_image(Path(name)):
                found.append(base / name)
            else:
                others[Path(name).suffix.lower() or "(no suffix)"] += 1
    if others:
        kinds = ", ".join(f"{n} {suffix}" for suffix, n in others.most_common())
        n, known = sum(others.values()), " ".join(sorted(IMAGE_EXTENSIONS))
        logger.warning(
            "%s: left out %d files that are not images (%s); images are %s", folder, n, kinds, known
        )
    return sorted(found)


def _heif_opener() -> bool:
    """Register pillow-heif's HEIC/HEIF decoder with PIL; False when the package is not installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _images_in_list(list_file: Path) -> list[Path]:
    """The paths listed one per line in a .txt/.lst file; relative lines are relative to its folder."""
    paths = []
    with open(list_file, encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            entry = line.strip()
            if not entry:
                continue
            path = Path(entry)
            if not path.is_absolute():
                path = list_file.parent / path
            if path.is_dir():
                paths.extend(_images_below(path))
            elif _is_image(path):
                paths.append(path)
            else:
                raise AnnotationError(
                    f"{list_file} line {line_no}: {entry!r} is neither a folder nor an image file "
                    f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
    return paths


def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand image files, folders (recursive, sorted) and .txt/.lst list files into image paths, in the order
    given; a path given twice is kept once."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: dict[Path, None] = {}
    for item in paths:
        path = Path(item)
        is_list = path.suffix.lower() in LIST_SUFFIXES
        if path.is_dir():
            expanded = _images_below(path)
        elif is_list or _is_image(path):
            if not path.is_file():
                raise ConfigError(f"{path}: {'list' if is_list else 'image'} file not found")
            expanded = _images_in_list(path) if is_list else [path]
        else:
            raise ConfigError(
                f"{path}: not a folder, an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) or a .txt/.lst list"
            )
        found.update(dict.fromkeys(expanded))
    return list(found)
