"""Annotation readers: one per distributed format, all returning the same table.

`read_annotations` reads AVA (`AVA.txt`), ELTA/TANet CSVs (`train.csv` ... with `score2..score11`),
generic CSVs (pyiqa meta-info, TAD66K), KonIQ-10k, PARA and AADB as they are distributed, and returns one
row per valid annotation with columns `image_id, path, mos, std, split, group, source, row` (then `p1..pK`
for formats with a vote distribution). Bad rows are skipped and listed in `df.attrs["problems"]`, never
dropped silently.
"""

from __future__ import annotations

import csv
import fnmatch
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd

from elta.data.images import IMAGE_EXTENSIONS, resolve_image_path
from elta.errors import AnnotationError

__all__ = ["BASE_COLUMNS", "FORMATS", "AnnotationError", "CsvColumns", "detect_format", "read_annotations"]

logger = logging.getLogger(__name__)

FORMATS = ("ava", "elta-csv", "csv", "koniq", "para", "aadb")
BASE_COLUMNS = ("image_id", "path", "mos", "std", "split", "group", "source", "row")

_IMAGE_NAMES = ("image", "image_id", "image_name", "img_name", "name", "filename", "file", "path")
_MOS_NAMES = ("mos", "MOS", "score", "mos_score", "mean_score")
_STD_NAMES = ("std", "sd", "SD", "mos_std")
_SPLIT_NAMES = ("split", "set")
_GROUP_NAMES = ("group", "tag", "scene", "category")
_SPLIT_VALUES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
_SPLIT_FILES = {
    "train": ("train.txt", "train.csv"),
    "val": ("val.txt", "validation.txt", "val.csv", "validation.csv"),
    "test": ("test.txt", "test.csv"),
}
_ELTA_VOTES = tuple(f"score{k}" for k in range(2, 12))
_KONIQ_VOTES = tuple(f"c{k}" for k in range(1, 6))
_AVA_FIELDS = 15
_MAX_LISTED = 20


@dataclass
class CsvColumns:
    """Column names of a generic CSV; None means: recognise a common name for that role."""

    image: str | None = None
    mos: str | None = None
    std: str | None = None
    dist: list[str] | None = None
    split: str | None = None
    group: str | None = None


@dataclass
class _Read:
    """What a format reader found, before the common validation.

    `blocks` hold one DataFrame of strings per file with columns source, line, image_id, name (image path
    relative to the image root), split, group, std and either mos or v1..vK (raw vote cells).
    """

    blocks: list[pd.DataFrame]
    problems: list[dict]
    base: Path
    image_folders: tuple[str, ...]
    split_source: str
    centers: list[float] | None = None
    vote_labels: list[str] = field(default_factory=list)
    score_range: tuple[float, float] | None = None


# ------------------------------------------------------------------------------------------ small helpers


def _problem(file: str, row: int, reason: str) -> dict:
    return {"file": file, "row": int(row), "reason": reason}


def _file_name(image_id: str) -> str:
    """The image file name for an id: the id itself when it has an image extension, else `<id>.jpg`."""
    return image_id if os.path.splitext(image_id)[1].lower() in IMAGE_EXTENSIONS else f"{image_id}.jpg"


def _id_key(image_id: str) -> str:
    """An id without surrounding blanks or image extension, to match ids across files ("12.jpg" == "12")."""
    stem, suffix = os.path.splitext(image_id.strip())
    return stem if suffix.lower() in IMAGE_EXTENSIONS else stem + suffix


def _split_from_name(path: Path) -> str | None:
    """train/val/test from words in a file name (PARA-GiaaTrain, imgListValidationRegression_score, test)."""
    words = {w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", path.stem)}
    found = {_SPLIT_VALUES[w] for w in words if w in _SPLIT_VALUES}
    return found.pop() if len(found) == 1 else None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _numbers(cells: pd.DataFrame) -> np.ndarray:
    """String cells (n, k) to float64 (n, k); a cell that is not a number becomes NaN."""
    try:
        return cells.to_numpy(dtype=np.float64)  # every cell parses: the fast, common case
    except (ValueError, TypeError):
        columns = [cells[c].astype(str).str.strip() for c in cells.columns]
        return np.column_stack(
            [pd.to_numeric(c, errors="coerce").to_numpy(dtype=np.float64) for c in columns]
        )


def _first_line(path: Path) -> str:
    """The first non-blank line of a text file."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for line in handle:
                if line.strip():
                    return line.rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not a UTF-8 text file ({err})") from err
    raise AnnotationError(f"{path}: the file is empty")


def _split_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(1-based line number, whitespace-separated fields) for every non-blank line of a text file."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return [(n, fields) for n, line in enumerate(handle, start=1) if (fields := line.split())]
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not a UTF-8 text file ({err})") from err


def _delimiter(header_line: str) -> str:
    """The most frequent of , tab ; in the header line (comma when none)."""
    counts = {d: header_line.count(d) for d in (",", "\t", ";")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _read_csv(path: Path) -> tuple[list[str], pd.DataFrame, list[dict]]:
    """Header, data rows as strings (plus column `_line`, 1-based), and problems for rows with a wrong field
    count. The header is line 1 when the file has no leading blank lines."""
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    problems: list[dict] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=_delimiter(_first_line(path)))
            end_of_previous = 0
            for record in reader:
                start, end_of_previous = end_of_previous + 1, reader.line_num
                if not any(cell.strip() for cell in record):
                    continue
                if header is None:
                    header = [cell.strip() for cell in record]
                elif len(record) != len(header):
                    reason = f"{len(record)} fields, expected {len(header)} (one per header column)"
                    problems.append(_problem(path.name, start, reason))
                else:
                    rows.append(record)
                    lines.append(start)
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not a UTF-8 text file ({err})") from err
    except csv.Error as err:
        raise AnnotationError(f"{path}: not a readable CSV file ({err})") from err
    if header is None:
        raise AnnotationError(f"{path}: the file is empty")
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise AnnotationError(f"{path}: column names appear twice: {duplicated}; rename them")
    table = pd.DataFrame(rows, columns=header, dtype=str) if rows else pd.DataFrame(columns=header, dtype=str)
    table["_line"] = np.asarray(lines, dtype=np.int64)
    return header, table, problems


def _pick_column(header: Sequence[str], names: Sequence[str]) -> str | None:
    """The first of `names` in the header, matched exactly first, then ignoring case."""
    for name in names:
        if name in header:
            return name
    lower = {}
    for column in header:
        lower.setdefault(column.lower(), column)
    for name in names:
        if name.lower() in lower:
            return lower[name.lower()]
    return None


def _require(path: Path, header: Sequence[str], needed: Sequence[str], what: str) -> None:
    missing = [name for name in needed if name not in header]
    if missing:
        raise AnnotationError(
            f"{path}: missing column(s) {missing} of the {what} layout; header is {list(header)}. "
            "Pass the right --format (or CsvColumns for a generic CSV)."
        )


def _block(
    source: str,
    table: pd.DataFrame,
    image_id: pd.Series,
    name: pd.Series | None = None,
    split: pd.Series | str = "train",
    group: pd.Series | str = "",
    std: pd.Series | str = "",
    mos: pd.Series | None = None,
    votes: Sequence[str] = (),
) -> pd.DataFrame:
    """One file's rows in the common raw layout (all strings)."""
    image_id = image_id.astype(str).str.strip()
    block = pd.DataFrame(
        {
            "source": source,
            "line": table["_line"].to_numpy(),
            "image_id": image_id.to_numpy(),
            "name": (image_id.map(_file_name) if name is None else name).to_numpy(),
        }
    )
    for column, value in (("split", split), ("group", group), ("std", std)):
        block[column] = value.astype(str).str.strip().to_numpy() if isinstance(value, pd.Series) else value
    if mos is not None:
        block["mos"] = mos.to_numpy()
    for k, column in enumerate(votes, start=1):
        block[f"v{k}"] = table[column].to_numpy()
    return block


def _find(folder: Path, pattern: str) -> list[Path]:
    """Files directly in `folder` whose name matches a glob pattern, ignoring case, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and fnmatch.fnmatch(p.name.lower(), pattern))


def _by_split(files: list[Path]) -> list[Path]:
    """Files ordered train, val, test, then the rest."""
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(files, key=lambda p: (order.get(_split_from_name(p) or "", 3), p.name))


# ------------------------------------------------------------------------------------------ format readers


def _read_ava(path: Path) -> _Read:
    """AVA.txt: index, image id, 10 vote counts (ratings 1..10), semantic tag 1, tag 2, challenge id."""
    if path.is_dir():
        found = _find(path, "ava.txt")
        if not found:
            raise AnnotationError(f"{path}: no AVA.txt in this folder; pass the annotation file itself")
        path = found[0]
    records, lines, problems = [], [], []
    for line_no, fields in _split_lines(path):
        if len(fields) != _AVA_FIELDS:
            reason = (
                f"{len(fields)} fields, expected {_AVA_FIELDS} (index, image id, 10 vote counts, "
                "2 semantic tags, challenge id)"
            )
            problems.append(_problem(path.name, line_no, reason))
            continue
        records.append(fields)
        lines.append(line_no)
    columns = ["index", "image_id", *[f"r{k}" for k in range(1, 11)], "tag1", "tag2", "challenge"]
    table = pd.DataFrame(records, columns=columns, dtype=str)
    table["_line"] = np.asarray(lines, dtype=np.int64)
    group = table["tag1"].where(table["tag1"] != "0", "")
    block = _block(path.name, table, table["image_id"], group=group, votes=columns[2:12])
    return _Read(
        blocks=[block],
        problems=problems,
        base=path.parent,
        image_folders=("images",),
        split_source="none: every row is train",
        centers=[float(k) for k in range(1, 11)],
        vote_labels=[f"vote count for rating {k}" for k in range(1, 11)],
    )


def _group_column(header: Sequence[str], words: Sequence[str]) -> str | None:
    """The first column whose name contains one of `words` (ignoring case)."""
    return next((c for c in header if any(w in c.lower() for w in words)), None)


def _elta_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = [path / name for names in _SPLIT_FILES.values() for name in names if name.endswith(".csv")]
    files = [f for f in files if f.is_file()]
    if not files:
        raise AnnotationError(f"{path}: no train.csv, val.csv or test.csv in this folder")
    return files


def _read_elta_csv(path: Path) -> _Read:
    """ELTA/TANet CSVs: image_id, score2..score11 (vote counts for ratings 1..10), optional score and tags."""
    blocks, problems, sources = [], [], []
    for file in _elta_files(path):
        header, table, bad = _read_csv(file)
        image_column = "image_id" if "image_id" in header else _pick_column(header, _IMAGE_NAMES)
        _require(
            file, header, [image_column or "image_id", *_ELTA_VOTES], "ELTA CSV (image_id, score2..score11)"
        )
        tag = _group_column(header, ("tag", "semantic"))
        group = (
            table[tag].where(~table[tag].map(lambda v: _is_number(v) and float(v) == 0), "") if tag else ""
        )
        split = _split_from_name(file) or "train"
        blocks.append(
            _block(file.name, table, table[image_column], split=split, group=group, votes=_ELTA_VOTES)
        )
        problems.extend(bad)
        sources.append(f"{file.name} -> {split}")
    return _Read(
        blocks=blocks,
        problems=problems,
        base=path if path.is_dir() else path.parent,
        image_folders=("images",),
        split_source=f"file names ({', '.join(sources)})",
        centers=[float(k) for k in range(1, 11)],
        vote_labels=list(_ELTA_VOTES),
    )


def _koniq_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = _find(path, "koniq10k_*.csv")
    if not found:
        raise AnnotationError(f"{path}: no koniq10k_*.csv in this folder")
    # koniq10k_distributions_sets.csv adds the official split in a `set` column; prefer it.
    with_sets = [f for f in found if "set" in _read_csv_header(f)]
    chosen = (with_sets or found)[0]
    if len(found) > 1:
        logger.info("%s: reading %s (of %s)", path, chosen.name, [f.name for f in found])
    return chosen


def _read_csv_header(path: Path) -> list[str]:
    line = _first_line(path)
    return [cell.strip() for cell in next(csv.reader([line], delimiter=_delimiter(line)))]


def _read_koniq(path: Path) -> _Read:
    """KonIQ-10k: image_name, c1..c5 (counts of ratings 1..5), c_total, MOS, SD, MOS_zscore[, set]."""
    file = _koniq_file(path)
    header, table, problems = _read_csv(file)
    _require(file, header, ["image_name", *_KONIQ_VOTES], "KonIQ-10k (image_name, c1..c5, MOS, SD)")
    std = table["SD"] if "SD" in header else ""
    split = table["set"] if "set" in header else "train"
    block = _block(file.name, table, table["image_name"], split=split, std=std, votes=_KONIQ_VOTES)
    return _Read(
        blocks=[block],
        problems=problems,
        base=file.parent,
        image_folders=("1024x768", "images"),
        split_source="split column 'set'" if "set" in header else "none: every row is train",
        centers=[float(k) for k in range(1, 6)],
        vote_labels=list(_KONIQ_VOTES),
    )


def _para_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    for folder in (path, path / "annotation"):
        found = _find(folder, "para-giaa*.csv") if folder.is_dir() else []
        if found:
            return _by_split(found)
    raise AnnotationError(f"{path}: no PARA-GiaaTrain.csv / PARA-GiaaTest.csv here or in annotation/")


def _para_bins(file: Path, header: Sequence[str]) -> list[tuple[float, str]]:
    """(bin centre, column) for the aestheticScore_<centre> columns, in score order."""
    bins = []
    for column in header:
        match = re.fullmatch(r"aestheticScore_(\d+(?:\.\d+)?)", column)
        if match:
            bins.append((float(match.group(1)), column))
    if len(bins) < 2:
        raise AnnotationError(
            f"{file}: no aestheticScore_1.0 .. aestheticScore_5.0 distribution columns; "
            f"header is {list(header)}"
        )
    return sorted(bins)


def _read_para(path: Path) -> _Read:
    """PARA GIAA: imageName, sessionId, aestheticScore_1.0..5.0 (votes or proportions), _std, semantic."""
    blocks, problems, sources = [], [], []
    bins: list[tuple[float, str]] | None = None
    files = _para_files(path)
    for file in files:
        header, table, bad = _read_csv(file)
        _require(file, header, ["imageName", "sessionId"], "PARA GIAA")
        file_bins = _para_bins(file, header)
        if bins is not None and file_bins != bins:
            raise AnnotationError(f"{file}: distribution columns differ from the other PARA file's")
        bins = file_bins
        session = table["sessionId"].str.strip()
        empty = session == ""
        bad += [_problem(file.name, line, "empty sessionId") for line in table.loc[empty, "_line"]]
        table = table.loc[~empty]
        session = session.loc[~empty]
        name = session + "/" + table["imageName"].str.strip().map(_file_name)
        semantic = _group_column(header, ("semantic", "scene"))
        split = _split_from_name(file) or "train"
        blocks.append(
            _block(
                file.name,
                table,
                table["imageName"],
                name=name,
                split=split,
                group=table[semantic] if semantic else "",
                std=table["aestheticScore_std"] if "aestheticScore_std" in header else "",
                votes=[column for _, column in bins],
            )
        )
        problems.extend(bad)
        sources.append(f"{file.name} -> {split}")
    return _Read(
        blocks=blocks,
        problems=problems,
        base=files[0].parent,
        image_folders=("imgs", "images"),
        split_source=f"file names ({', '.join(sources)})",
        centers=[centre for centre, _ in bins],
        vote_labels=[column for _, column in bins],
    )


def _aadb_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    found = _find(path, "imglist*regression_score.txt")
    if not found:
        raise AnnotationError(f"{path}: no imgList*Regression_score.txt files in this folder")
    return _by_split(found)


def _read_aadb(path: Path) -> _Read:
    """AADB: `name score` per line, score in [0, 1]; one file per split."""
    blocks, problems, sources = [], [], []
    files = _aadb_files(path)
    for file in files:
        records, lines = [], []
        for line_no, fields in _split_lines(file):
            if len(fields) != 2:
                reason = f"{len(fields)} fields, expected 2 (image name, score)"
                problems.append(_problem(file.name, line_no, reason))
                continue
            records.append(fields)
            lines.append(line_no)
        table = pd.DataFrame(records, columns=["name", "score"], dtype=str)
        table["_line"] = np.asarray(lines, dtype=np.int64)
        split = _split_from_name(file) or "train"
        blocks.append(_block(file.name, table, table["name"], split=split, mos=table["score"]))
        sources.append(f"{file.name} -> {split}")
    return _Read(
        blocks=blocks,
        problems=problems,
        base=files[0].parent,
        image_folders=("datasetImages_warp256", "images"),
        split_source=f"file names ({', '.join(sources)})",
        score_range=(0.0, 1.0),
    )


def _explicit_or_pick(
    file: Path, header: Sequence[str], explicit: str | None, names: Sequence[str], role: str
) -> str | None:
    if explicit is None:
        return _pick_column(header, names)
    if explicit not in header:
        raise AnnotationError(
            f"{file}: no column {explicit!r} (asked for as the {role} column); header is {list(header)}"
        )
    return explicit


def _read_generic_csv(path: Path, columns: CsvColumns, centers: list[float] | None) -> _Read:
    """A CSV with an image column and a MOS column (or vote/probability columns); names configurable."""
    if path.is_dir():
        raise AnnotationError(f"{path}: a generic CSV is read from one file; pass the CSV file itself")
    header, table, problems = _read_csv(path)
    image = _explicit_or_pick(path, header, columns.image, _IMAGE_NAMES, "image")
    if image is None:
        raise AnnotationError(
            f"{path}: no image column (looked for {', '.join(_IMAGE_NAMES)}); header is {list(header)}. "
            "Name it with CsvColumns(image=...)."
        )
    dist = list(columns.dist or [])
    missing = [c for c in dist if c not in header]
    if missing:
        raise AnnotationError(f"{path}: distribution column(s) {missing} not in the header {list(header)}")
    mos = None
    if not dist:
        mos = _explicit_or_pick(path, header, columns.mos, _MOS_NAMES, "MOS")
        if mos is None:
            hint = (
                " A DMOS column (lower is better) is not read as MOS; convert it first."
                if _pick_column(header, ["dmos"])
                else ""
            )
            raise AnnotationError(
                f"{path}: no MOS column (looked for {', '.join(_MOS_NAMES)}); header is {list(header)}."
                f"{hint} Name it with CsvColumns(mos=...) or give vote columns with CsvColumns(dist=[...])."
            )
    if dist and centers is not None and len(centers) != len(dist):
        raise AnnotationError(f"{path}: {len(centers)} bin centres for {len(dist)} distribution columns")
    if dist:
        centers = (
            [float(c) for c in centers]
            if centers is not None
            else [float(k) for k in range(1, len(dist) + 1)]
        )
    std = _explicit_or_pick(path, header, columns.std, _STD_NAMES, "std")
    split = _explicit_or_pick(path, header, columns.split, _SPLIT_NAMES, "split")
    group = _explicit_or_pick(path, header, columns.group, _GROUP_NAMES, "group")
    block = _block(
        path.name,
        table,
        table[image],
        split=table[split] if split else "train",
        group=table[group] if group else "",
        std=table[std] if std else "",
        mos=table[mos] if mos else None,
        votes=dist,
    )
    return _Read(
        blocks=[block],
        problems=problems,
        base=path.parent,
        image_folders=("images",),
        split_source=f"split column {split!r}" if split else "none: every row is train",
        centers=centers if dist else None,
        vote_labels=dist,
    )


# ------------------------------------------------------------------------------------------ detection


def _elta_header(header: Sequence[str]) -> bool:
    return all(name in header for name in _ELTA_VOTES)


def _formats_in_folder(folder: Path) -> list[str]:
    found = []
    if _find(folder, "ava.txt"):
        found.append("ava")
    split_csvs = [folder / n for names in _SPLIT_FILES.values() for n in names if n.endswith(".csv")]
    if any(f.is_file() and _elta_header(_read_csv_header(f)) for f in split_csvs):
        found.append("elta-csv")
    annotation = folder / "annotation"
    if _find(folder, "para-giaa*.csv") or (annotation.is_dir() and _find(annotation, "para-giaa*.csv")):
        found.append("para")
    if _find(folder, "imglist*regression_score.txt"):
        found.append("aadb")
    if _find(folder, "koniq10k_*.csv"):
        found.append("koniq")
    return found


def _format_by_file_name(path: Path) -> str | None:
    name = path.name.lower()
    patterns = {
        "ava": "ava.txt",
        "para": "para-giaa*.csv",
        "aadb": "imglist*regression_score.txt",
        "koniq": "koniq10k_*.csv",
    }
    return next((fmt for fmt, pattern in patterns.items() if fnmatch.fnmatch(name, pattern)), None)


def _format_by_content(line: str) -> str | None:
    fields = line.split()
    if "," not in line and len(fields) == _AVA_FIELDS and all(_is_number(f) for f in fields):
        return "ava"
    if "," not in line and len(fields) == 2 and _is_number(fields[1]):
        return "aadb"
    header = [cell.strip() for cell in next(csv.reader([line], delimiter=_delimiter(line)))]
    if all(c in header for c in _KONIQ_VOTES) and _pick_column(header, ["MOS"]):
        return "koniq"
    if "imageName" in header and "aestheticScore_mean" in header:
        return "para"
    if _elta_header(header):
        return "elta-csv"
    if _pick_column(header, _IMAGE_NAMES) and _pick_column(header, _MOS_NAMES):
        return "csv"
    return None


_TRIED = (
    "by name: AVA.txt, train/val/test.csv with score2..score11 (elta-csv), PARA-Giaa*.csv, "
    "imgList*Regression_score.txt (aadb), koniq10k_*.csv; by content: 15 numeric fields (ava), "
    "'name score' (aadb), c1..c5 + MOS (koniq), imageName + aestheticScore_mean (para), "
    "score2..score11 (elta-csv), an image column + a MOS column (csv)"
)


def detect_format(path: str | Path) -> str:
    """The annotation format of a file or folder, from names first, then from the first line."""
    path = Path(path)
    if path.is_dir():
        found = _formats_in_folder(path)
        if "ava" in found:  # split CSVs next to AVA.txt are AVA's split lists
            return "ava"
        if len(found) == 1:
            return found[0]
        names = sorted(p.name for p in path.iterdir())
        shown = ", ".join(names[:_MAX_LISTED]) + (
            f", … ({len(names)} entries)" if len(names) > _MAX_LISTED else ""
        )
        what = f"it matches several formats {found}" if found else "no known annotation file is in it"
        raise AnnotationError(
            f"{path}: cannot tell the annotation format: {what}. Tried {_TRIED}. The folder holds: {shown}. "
            f"Pass the annotation file itself or --format (one of {', '.join(FORMATS)})."
        )
    if not path.is_file():
        raise AnnotationError(f"{path}: no such file or folder")
    by_name = _format_by_file_name(path)
    if by_name:
        return by_name
    line = _first_line(path)
    by_content = _format_by_content(line)
    if by_content:
        return by_content
    raise AnnotationError(
        f"{path}: cannot tell the annotation format. Tried {_TRIED}. First line: {line[:200]!r}. "
        f"Pass --format (one of {', '.join(FORMATS)}) and, for a generic CSV, the column names."
    )


# ------------------------------------------------------------------------------------------ split lists


def _split_list_ids(file: Path) -> list[tuple[int, str]]:
    """(line, id) pairs of a split list: one id per line (.txt) or a CSV's image_id / first column."""
    if file.suffix.lower() == ".csv":
        header, table, _ = _read_csv(file)
        column = "image_id" if "image_id" in header else _pick_column(header, _IMAGE_NAMES) or header[0]
        return [
            (int(line), str(value).strip()) for line, value in zip(table["_line"], table[column], strict=True)
        ]
    return [(line_no, fields[0]) for line_no, fields in _split_lines(file)]


def _split_list_files(folder: Path) -> list[tuple[str, Path]]:
    return [
        (split, folder / n) for split, names in _SPLIT_FILES.items() for n in names if (folder / n).is_file()
    ]


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
                    problems.append(_problem(file.name, line, reason))
                continue
            listed[key] = (split, file.name, line, image_id)
    keys = table["image_id"].map(_id_key)
    table["split"] = keys.map(lambda k: listed[k][0] if k in listed else "")
    present = set(keys)
    for key, (_, file_name, line, image_id) in listed.items():
        if key not in present:
            problems.append(_problem(file_name, line, f"image id {image_id!r} has no valid row in {sources}"))
    order = {file.name: i for i, (_, file) in enumerate(files)}
    return sorted(problems, key=lambda p: (order[p["file"]], p["row"]))


# ------------------------------------------------------------------------------------------ validation


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
    read: _Read,
    label: str,
    root: Path,
    split_files: list[tuple[str, Path]],
    score_range: tuple[float, float] | None,
) -> tuple[pd.DataFrame, list[dict], tuple[float, float], int]:
    """Validate the raw rows; returns the table, all problems, the score range and the number of rows read."""
    raw = pd.concat(read.blocks, ignore_index=True)
    n = len(raw)
    reasons: list[str | None] = [None] * n
    ids = raw["image_id"].astype(str).to_numpy()
    _flag(reasons, np.array([not i for i in ids], dtype=bool), lambda i: "empty image id")
    paths = _image_paths(root, raw["name"].astype(str).tolist(), reasons)

    probabilities = None
    std = _numbers(raw[["std"]])[:, 0]
    if read.centers is not None:
        centers = np.asarray(read.centers, dtype=np.float64)
        votes = _distribution(raw, len(centers), read.vote_labels, reasons)
        with np.errstate(invalid="ignore", divide="ignore"):
            probabilities = votes / votes.sum(axis=1, keepdims=True)
            mos = probabilities @ centers
            spread = np.sqrt(np.clip(probabilities @ centers**2 - mos**2, 0.0, None))
        std = np.where(np.isfinite(std), std, spread)  # formats without a std column: spread of the votes
        lo, hi = score_range or read.score_range or (float(centers[0]), float(centers[-1]))
    else:
        mos = _numbers(raw[["mos"]])[:, 0]
        _flag(reasons, ~np.isfinite(mos), lambda i: f"MOS {raw['mos'].iat[i]!r} is not a finite number")
        if score_range or read.score_range:
            lo, hi = score_range or read.score_range
        else:
            finite = mos[np.isfinite(mos)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            logger.info("%s: score range not given, inferred from the data as [%g, %g]", label, lo, hi)
    tolerance = 1e-9 * max(1.0, abs(hi - lo))
    outside = (mos < lo - tolerance) | (mos > hi + tolerance)
    _flag(reasons, outside, lambda i: f"MOS {mos[i]:g} outside the score range [{lo:g}, {hi:g}]")

    split = raw["split"].astype(str).str.strip().str.lower().map(_SPLIT_VALUES)
    _flag(
        reasons,
        split.isna().to_numpy(),
        lambda i: (
            f"split {raw['split'].iat[i]!r} is not train/training, val/valid/validation or test/testing"
        ),
    )
    first_seen: dict[str, int] = {}
    for i, image_id in enumerate(ids):
        if reasons[i] is None:
            if image_id in first_seen:
                j = first_seen[image_id]
                reasons[i] = (
                    f"duplicate image id {image_id!r} "
                    f"(first in {raw['source'].iat[j]} line {raw['line'].iat[j]})"
                )
            else:
                first_seen[image_id] = i

    ok = np.array([r is None for r in reasons], dtype=bool)
    problems = read.problems + [
        _problem(raw["source"].iat[i], raw["line"].iat[i], reasons[i]) for i in np.flatnonzero(~ok)
    ]
    table = pd.DataFrame(
        {
            "image_id": ids[ok],
            "path": np.asarray(paths, dtype=object)[ok],
            "mos": mos[ok].astype(np.float64),
            "std": std[ok].astype(np.float64),
            "split": split.to_numpy()[ok],
            "group": raw["group"].astype(str).str.strip().to_numpy()[ok],
            "source": raw["source"].to_numpy()[ok],
            "row": raw["line"].to_numpy(dtype=np.int64)[ok],
        }
    )
    if probabilities is not None:
        for k in range(probabilities.shape[1]):
            table[f"p{k + 1}"] = probabilities[ok, k]
    order = {
        source: i for i, source in enumerate(dict.fromkeys(b["source"].iat[0] for b in read.blocks if len(b)))
    }
    problems.sort(key=lambda p: (order.get(p["file"], len(order)), p["row"]))
    if split_files:
        problems += _apply_split_lists(table, split_files, ", ".join(order) or "the annotations")
    return table, problems, (float(lo), float(hi)), n + len(read.problems)


# ------------------------------------------------------------------------------------------ entry point


def _default_images_root(base: Path, folders: Sequence[str]) -> Path:
    """The first existing usual image folder next to the annotations (or one level up), else `base`."""
    for parent in (base, base.parent):
        for folder in folders:
            if (parent / folder).is_dir():
                return parent / folder
    return base


def _split_folder(
    splits: str | Path | None, fmt: str, base: Path
) -> tuple[list[tuple[str, Path]], Path | None]:
    if splits is not None:
        folder = Path(splits)
        if not folder.is_dir():
            what = "is a file" if folder.exists() else "does not exist"
            raise AnnotationError(f"{folder} {what}: splits must be a folder holding train/val/test lists")
        files = _split_list_files(folder)
        if not files:
            raise AnnotationError(f"{folder}: no train.txt, val.txt, test.txt (or .csv) split lists in it")
        return files, folder
    if fmt == "ava":
        files = _split_list_files(base)
        return files, (base if files else None)
    return [], None


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
) -> pd.DataFrame:
    """Read an annotation file or folder into the common table (see the module docstring).

    `images` is the image root (default: the format's usual folder next to the annotations); `splits` a
    folder of train/val/test id lists that overrides the format's own split; `score_range` the valid MOS
    range (default: the dataset's; inferred from the data for a scalar generic CSV); `columns` and `centers`
    describe a generic CSV. With `strict=True` any bad row raises AnnotationError instead of being skipped.
    """
    path = Path(path)
    if not path.exists():
        raise AnnotationError(f"{path}: no such file or folder")
    if format not in (*FORMATS, "auto"):
        raise AnnotationError(f"unknown format {format!r}; use one of {', '.join(FORMATS)} or auto")
    fmt = detect_format(path) if format == "auto" else format
    if score_range is not None and not float(score_range[0]) < float(score_range[1]):
        raise AnnotationError(f"score_range {score_range} must be (low, high) with low < high")
    if fmt != "csv" and ((columns is not None and columns != CsvColumns()) or centers is not None):
        logger.warning("%s: columns/centers only apply to generic CSVs; ignored for format %s", path, fmt)
    readers: dict[str, Callable[[Path], _Read]] = {
        "ava": _read_ava,
        "elta-csv": _read_elta_csv,
        "koniq": _read_koniq,
        "para": _read_para,
        "aadb": _read_aadb,
    }
    if fmt == "csv":
        read = _read_generic_csv(path, columns or CsvColumns(), centers)
    else:
        read = readers[fmt](path)

    root = Path(images) if images is not None else _default_images_root(read.base, read.image_folders)
    root = root.absolute()
    if not root.is_dir():
        logger.warning("%s: image folder %s does not exist", path, root)
    split_files, split_folder = _split_folder(splits, fmt, read.base)
    range_arg = (float(score_range[0]), float(score_range[1])) if score_range is not None else None
    table, problems, (lo, hi), n_read = _finish(read, str(path), root, split_files, range_arg)
    if split_folder is not None:
        names = "/".join(dict.fromkeys(f.name for _, f in split_files))
        split_source = f"split lists {names} in {split_folder}"
    else:
        split_source = read.split_source

    if n_read == 0:
        raise AnnotationError(f"{path}: no data rows (only a header or blank lines)")
    if table.empty:
        _raise_strict(path, problems, "No valid rows: fix the rows above or pass the right --format.")
    if problems:
        first = problems[0]
        logger.warning(
            "%s: %d problem(s), the rows are skipped (first: %s:%d: %s); see df.attrs['problems']",
            path,
            len(problems),
            first["file"],
            first["row"],
            first["reason"],
        )
        if strict:
            _raise_strict(path, problems, "Fix these rows, or read with strict=False to skip them.")

    has_distribution = read.centers is not None
    table.attrs.update(
        {
            "format": fmt,
            "centers": list(read.centers) if has_distribution else [lo, hi],
            "has_distribution": has_distribution,
            "score_range": [lo, hi],
            "acc_threshold": 5.0 if fmt in ("ava", "elta-csv") else (lo + hi) / 2.0,
            "problems": problems,
            "split_source": split_source,
            "images_root": str(root),
            "rows_read": n_read,
        }
    )
    return table
