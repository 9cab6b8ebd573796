"""`read_annotations`: any registered format (elta.data.formats) into one validated table and its facts.

The table has one row per valid annotation with columns `image_id, path, mos, std, split, group, source, row`
(then `p1..pK` for formats with a vote distribution). Bad rows are skipped and listed in
`Annotations.problems`, never dropped silently; what the dataset is (format, bins, score range, image root,
where the split came from) is `Annotations.info`, a `DatasetInfo`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd

from elta.data.formats import (
    FORMATS,
    IMAGE_NAMES,
    SPLIT_VALUES,
    CsvColumns,
    Rows,
    detect_format,
    pick_column,
    problem,
    read_csv,
    split_lines,
)
from elta.data.images import IMAGE_EXTENSIONS, resolve_image_path
from elta.errors import AnnotationError

__all__ = ["Annotations", "DatasetInfo", "read_annotations"]

logger = logging.getLogger(__name__)

_SPLIT_FILES = {
    "train": ("train.txt", "train.csv"),
    "val": ("val.txt", "validation.txt", "val.csv", "validation.csv"),
    "test": ("test.txt", "test.csv"),
}
_MAX_LISTED = 20


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, as read: the facts training, evaluation and checkpoints take from it.

    `centers` are the bin centres of the vote distribution, or `[low, high]` when the MOS is a scalar
    (`has_distribution` False); `score_range` is `[low, high]` of valid MOS; `acc_threshold` the binary
    accuracy threshold on that scale; `images_root` the absolute image folder; `split_source` says where the
    train/val/test split came from; `rows_read` counts the data rows read, skipped ones included.
    """

    format: str
    source: str
    images_root: str
    centers: list[float]
    has_distribution: bool
    score_range: list[float]
    acc_threshold: float
    split_source: str
    rows_read: int

    @property
    def num_bins(self) -> int:
        """K, the number of distribution bins; 0 for a scalar MOS."""
        return len(self.centers) if self.has_distribution else 0


@dataclass(frozen=True)
class Annotations:
    """What `read_annotations` returns: the table, the dataset's facts, and the skipped rows (`problems`:
    dicts with file, row (1-based line) and reason)."""

    frame: pd.DataFrame
    info: DatasetInfo
    problems: list[dict]


# ------------------------------------------------------------------------------------------ split lists


def _id_key(image_id: str) -> str:
    """An id without surrounding blanks or image extension, to match ids across files ("12.jpg" == "12")."""
    stem, suffix = os.path.splitext(image_id.strip())
    return stem if suffix.lower() in IMAGE_EXTENSIONS else stem + suffix


def _split_list_ids(file: Path) -> list[tuple[int, str]]:
    """(line, id) pairs of a split list: one id per line (.txt) or a CSV's image_id / first column."""
    if file.suffix.lower() == ".csv":
        header, table, _ = read_csv(file)
        column = "image_id" if "image_id" in header else pick_column(header, IMAGE_NAMES) or header[0]
        return list(zip(table["_line"].astype(int), table[column].astype(str).str.strip(), strict=True))
    return [(line_no, fields[0]) for line_no, fields in split_lines(file)]


def _apply_split_lists(table: pd.DataFrame, files: list[tuple[str, Path]], sources: str) -> list[dict]:
    """Set `table.split` from split lists (rows in none get ""); returns problems of the lists."""
    listed: dict[str, tuple[str, str, int, str]] = {}  # id key -> (split, file name, line, id as listed)
    problems = []
    for split, file in files:
        for line, image_id in _split_list_ids(file):
            key = _id_key(image_id)
            if key in listed:
                first_split, first_file, first_line, _ = listed[key]
                if first_split != split:
                    where = f"{first_file} line {first_line}"
                    reason = f"image id {image_id!r} is also in {where}; kept as {first_split}"
                    problems.append(problem(file.name, line, reason))
                continue
            listed[key] = (split, file.name, line, image_id)
    keys = table["image_id"].map(_id_key)
    table["split"] = keys.map(lambda k: listed[k][0] if k in listed else "")
    present = set(keys)
    for key, (_, file_name, line, image_id) in listed.items():
        if key not in present:
            problems.append(problem(file_name, line, f"image id {image_id!r} has no valid row in {sources}"))
    order = {file.name: i for i, (_, file) in enumerate(files)}
    return sorted(problems, key=lambda p: (order[p["file"]], p["row"]))


def _split_list_files(folder: Path) -> list[tuple[str, Path]]:
    found = [(split, folder / name) for split, names in _SPLIT_FILES.items() for name in names]
    return [(split, file) for split, file in found if file.is_file()]


def _split_lists(splits: str | Path | None, beside: bool, base: Path) -> list[tuple[str, Path]]:
    """(split, file) of the split lists to apply: those in folder `splits`, else (with `beside`) in `base`."""
    if splits is None:
        return _split_list_files(base) if beside else []
    folder = Path(splits)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise AnnotationError(f"{folder} {what}: splits must be a folder holding train/val/test lists")
    files = _split_list_files(folder)
    if not files:
        raise AnnotationError(f"{folder}: no train.txt, val.txt, test.txt (or .csv) split lists in it")
    return files


# ------------------------------------------------------------------------------------------ validation


def _numbers(cells: pd.DataFrame) -> np.ndarray:
    """String cells (n, k) to float64 (n, k); a cell that is not a number becomes NaN."""
    try:
        return cells.to_numpy(dtype=np.float64)  # every cell parses: the fast, common case
    except (ValueError, TypeError):
        columns = [pd.to_numeric(cells[c].astype(str).str.strip(), errors="coerce") for c in cells.columns]
        return np.column_stack([c.to_numpy(dtype=np.float64) for c in columns])


def _flag(reasons: list[str | None], mask: np.ndarray, reason_at: Callable[[int], str]) -> None:
    """Give `reason_at(i)` to every row i in `mask` that has no reason yet."""
    for i in np.flatnonzero(mask):
        if reasons[i] is None:
            reasons[i] = reason_at(int(i))


def _distribution(raw: pd.DataFrame, k: int, labels: list[str], reasons: list) -> np.ndarray:
    """Vote cells (n, K) to floats, flagging non-numeric, negative and all-zero rows."""
    cells = raw[[f"v{j}" for j in range(1, k + 1)]]
    votes = _numbers(cells)
    bad = ~np.isfinite(votes)
    _flag(reasons, bad.any(axis=1), lambda i: _bad_vote(labels, cells, bad, i, "is not a number"))
    negative = np.where(bad, 0.0, votes) < 0
    _flag(reasons, negative.any(axis=1), lambda i: _bad_vote(labels, cells, negative, i, "is negative"))
    zero = np.where(bad, 1.0, votes).sum(axis=1) == 0
    _flag(reasons, zero, lambda i: "all vote counts are zero")
    return votes


def _bad_vote(labels: list[str], cells: pd.DataFrame, mask: np.ndarray, i: int, what: str) -> str:
    j = int(np.flatnonzero(mask[i])[0])
    return f"{labels[j]} = {cells.iat[i, j]!r} {what}"


def _image_paths(root: Path, names: list[str], reasons: list[str | None]) -> list[str]:
    """resolve_image_path for every row as a string; unsafe names get a reason and path ""."""
    # A plain file name (no separator, not starting with ".") is always safe: join it without pathlib,
    # which is several times faster on AVA's 255k rows and gives the same string.
    plain = re.compile(r"[\w\- ][\w\-. ]*")
    base = str(root)
    paths = [""] * len(names)
    for i, name in enumerate(names):
        if reasons[i] is not None:
            continue
        if plain.fullmatch(name):
            paths[i] = os.path.join(base, name)
            continue
        try:
            paths[i] = str(resolve_image_path(root, name))
        except ValueError as err:
            reasons[i] = str(err)
    return paths


def _finish(
    rows: Rows,
    label: str,
    root: Path,
    centers: list[float] | None,
    score_range: tuple[float, float] | None,
    split_files: list[tuple[str, Path]],
) -> tuple[pd.DataFrame, list[dict], tuple[float, float]]:
    """Validate the raw rows; returns the table, all problems and the score range."""
    raw = pd.concat(rows.blocks, ignore_index=True)
    reasons: list[str | None] = [None] * len(raw)
    ids = raw["image_id"].astype(str).to_numpy()
    _flag(reasons, np.array([not i for i in ids], dtype=bool), lambda i: "empty image id")
    paths = _image_paths(root, raw["name"].astype(str).tolist(), reasons)

    probabilities = None
    std = _numbers(raw[["std"]])[:, 0]
    if centers is not None:
        c = np.asarray(centers, dtype=np.float64)
        votes = _distribution(raw, len(c), rows.vote_labels, reasons)
        with np.errstate(invalid="ignore", divide="ignore"):
            probabilities = votes / votes.sum(axis=1, keepdims=True)
            mos = probabilities @ c
            spread = np.sqrt(np.clip(probabilities @ c**2 - mos**2, 0.0, None))
        std = np.where(np.isfinite(std), std, spread)  # formats without a std column: spread of the votes
        lo, hi = score_range or (float(c[0]), float(c[-1]))
    else:
        mos = _numbers(raw[["mos"]])[:, 0]
        _flag(reasons, ~np.isfinite(mos), lambda i: f"MOS {raw['mos'].iat[i]!r} is not a finite number")
        lo, hi = score_range if score_range else (None, None)  # None: inferred from the training rows below
    if lo is not None:
        tolerance = 1e-9 * max(1.0, abs(hi - lo))
        outside = (mos < lo - tolerance) | (mos > hi + tolerance)
        _flag(reasons, outside, lambda i: f"MOS {mos[i]:g} outside the score range [{lo:g}, {hi:g}]")

    split = raw["split"].astype(str).str.strip().str.lower().map(SPLIT_VALUES)
    known = "train/training, val/valid/validation or test/testing"
    _flag(reasons, split.isna().to_numpy(), lambda i: f"split {raw['split'].iat[i]!r} is not {known}")
    first_seen: dict[str, int] = {}
    for i, image_id in enumerate(ids):
        if reasons[i] is None and image_id in first_seen:
            j = first_seen[image_id]
            reasons[i] = (
                f"duplicate image id {image_id!r} (first in {raw['source'].iat[j]} line {raw['line'].iat[j]})"
            )
        elif reasons[i] is None:
            first_seen[image_id] = i

    ok = np.array([r is None for r in reasons], dtype=bool)
    problems = rows.problems + [
        problem(raw["source"].iat[i], raw["line"].iat[i], reasons[i]) for i in np.flatnonzero(~ok)
    ]
    columns = {"image_id": ids, "path": np.asarray(paths, dtype=object), "mos": mos.astype(np.float64)}
    columns |= {"std": std.astype(np.float64), "split": split.to_numpy()}
    columns |= {"group": raw["group"].astype(str).str.strip().to_numpy(), "source": raw["source"].to_numpy()}
    columns["row"] = raw["line"].to_numpy(dtype=np.int64)
    table = pd.DataFrame({name: values[ok] for name, values in columns.items()})
    if probabilities is not None:
        for k in range(probabilities.shape[1]):
            table[f"p{k + 1}"] = probabilities[ok, k]
    sources = dict.fromkeys(b["source"].iat[0] for b in rows.blocks if len(b))
    order = {source: i for i, source in enumerate(sources)}
    problems.sort(key=lambda p: (order.get(p["file"], len(order)), p["row"]))
    if split_files:
        problems += _apply_split_lists(table, split_files, ", ".join(order) or "the annotations")
    if lo is None:
        lo, hi = _inferred_range(table, label)
    return table, problems, (float(lo), float(hi))


def _inferred_range(table: pd.DataFrame, label: str) -> tuple[float, float]:
    """[min, max] of the training rows' MOS, with a warning that says so; of every row when the training rows
    do not span a range (fewer than two distinct values)."""
    train = table.loc[table["split"] == "train", "mos"]
    use_train = train.nunique() > 1
    rows = train if use_train else table["mos"]
    if rows.empty:
        return 0.0, 1.0
    lo, hi = float(rows.min()), float(rows.max())
    outside = int(((table["mos"] < lo) | (table["mos"] > hi)).sum())
    which = "training rows" if use_train else "rows (the training rows span no range)"
    beyond = f" ({outside} validation / test row(s) lie outside it)" if outside else ""
    message = "%s: score range not given; inferred from the MOS of the %d %s as [%g, %g]%s. Give the rating "
    message += "scale's ends with --score-range LOW HIGH (data.score_range in a config file)"
    logger.warning(message, label, len(rows), which, lo, hi, beyond)
    return lo, hi


# ------------------------------------------------------------------------------------------ entry point


def _raise_strict(path: Path, problems: list[dict], fix: str) -> NoReturn:
    listed = "\n".join(f"  {p['file']}:{p['row']}: {p['reason']}" for p in problems[:_MAX_LISTED])
    more = f"\n  … {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise AnnotationError(f"{path}: {len(problems)} problem(s):\n{listed}{more}\n{fix}")


def read_annotations(
    path: str | Path,
    format: str = "auto",
    images: str | Path | None = None,
    *,
    splits: str | Path | None = None,
    strict: bool = False,
    columns: CsvColumns | None = None,
    score_range: tuple[float, float] | None = None,
    centers: list[float] | None = None,
) -> Annotations:
    """Read an annotation file or folder into the common table (see the module docstring).

    `format` is a name in `FORMATS` or auto. `images` is the image root (default: the format's usual folder
    next to the annotations); `splits` a folder of train/val/test id lists that overrides the format's own
    split; `score_range` the valid MOS range (default: the format's; inferred from the data for a scalar
    generic CSV); `columns` and `centers` (default 1..K) describe a generic CSV. With `strict=True` any bad
    row raises AnnotationError instead of being skipped.
    """
    path = Path(path)
    if not path.exists():
        raise AnnotationError(f"{path}: no such file or folder")
    if format != "auto" and format not in FORMATS:
        raise AnnotationError(f"unknown format {format!r}; use one of {', '.join(FORMATS)} or auto")
    fmt = FORMATS[detect_format(path) if format == "auto" else format]
    if score_range is not None and not float(score_range[0]) < float(score_range[1]):
        raise AnnotationError(f"score_range {score_range} must be (low, high) with low < high")
    if not fmt.generic and ((columns is not None and columns != CsvColumns()) or centers is not None):
        logger.warning(
            "%s: columns/centers only apply to generic CSVs; ignored for format %s", path, fmt.name
        )

    files = fmt.annotation_files(path)
    rows = fmt.reader(files, columns or CsvColumns())
    bins = None
    if rows.vote_labels:
        k = len(rows.vote_labels)
        bins = [float(c) for c in fmt.centers or centers or range(1, k + 1)]
        if len(bins) != k:
            raise AnnotationError(f"{path}: {len(bins)} bin centres for {k} distribution columns")

    base = files[0].parent
    if images is None:  # the first of the format's usual image folders here or one level up, else here
        usual = (parent / folder for parent in (base, base.parent) for folder in fmt.image_folders)
        images = next((folder for folder in usual if folder.is_dir()), base)
    root = Path(images).absolute()
    if not root.is_dir():
        logger.warning("%s: image folder %s does not exist", path, root)
    split_files = _split_lists(splits, fmt.split_lists, base)
    given = (float(score_range[0]), float(score_range[1])) if score_range is not None else fmt.score_range
    table, problems, (lo, hi) = _finish(rows, str(path), root, bins, given, split_files)
    names = "/".join(dict.fromkeys(f.name for _, f in split_files))
    split_source = f"split lists {names} in {split_files[0][1].parent}" if split_files else rows.split_source

    n_read = sum(len(b) for b in rows.blocks) + len(rows.problems)
    if n_read == 0:
        raise AnnotationError(f"{path}: no data rows (only a header or blank lines)")
    if table.empty:
        _raise_strict(path, problems, "No valid rows: fix the rows above or pass the right --format.")
    if problems:
        first = "{file}:{row}: {reason}".format(**problems[0])
        message = "%s: %d problem(s), the rows are skipped (first: %s); see Annotations.problems"
        logger.warning(message, path, len(problems), first)
        if strict:
            _raise_strict(path, problems, "Fix these rows, or read with strict=False to skip them.")

    threshold = fmt.acc_threshold if fmt.acc_threshold is not None else (lo + hi) / 2.0
    centers = bins if bins is not None else [lo, hi]
    scale = {"centers": centers, "score_range": [lo, hi], "acc_threshold": threshold}
    where = {"format": fmt.name, "source": str(path), "images_root": str(root), "split_source": split_source}
    info = DatasetInfo(**where, **scale, has_distribution=bins is not None, rows_read=n_read)
    return Annotations(table, info, problems)
