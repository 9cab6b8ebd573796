"""Annotation formats as they are distributed: one registered entry each, next to its reader.

An entry names the format's files and the first line that gives it away, reads its files into raw rows
(`Rows`), and carries the dataset's scale: bin centres, score range, accuracy threshold and
its usual image folder. Adding a format is a reader plus one `register_format(Format(...))`; `detect_format`
and the tests loop over `FORMATS`. The text-reading helpers the readers share close the module.
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

import numpy as np
import pandas as pd

from elta.data.images import IMAGE_EXTENSIONS
from elta.errors import AnnotationError

__all__ = [
    "FORMATS",
    "IMAGE_NAMES",
    "SPLIT_VALUES",
    "CsvColumns",
    "Format",
    "Rows",
    "detect_format",
    "register_format",
]

logger = logging.getLogger(__name__)

_MAX_LISTED = 20
IMAGE_NAMES = ("image", "image_id", "image_name", "img_name", "name", "filename", "file", "path")
_WORDS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
SPLIT_VALUES = {word: split for split, words in _WORDS.items() for word in words}  # word in a file -> split


@dataclass
class Rows:
    """What a format reader found, before the common validation.

    `blocks` hold one DataFrame of strings per file with columns source, line, image_id, name (image path
    relative to the image root), split, group, std and either mos or v1..vK (raw vote cells, named by
    `vote_labels` in messages; no labels: a scalar MOS). `problems` are rows that could not be split.
    """

    blocks: list[pd.DataFrame]
    problems: list[dict]
    split_source: str
    vote_labels: list[str] = field(default_factory=list)


@dataclass
class CsvColumns:
    """Column names of a generic CSV; None means: recognise a common name for that role."""

    image: str | None = None
    mos: str | None = None
    std: str | None = None
    dist: list[str] | None = None
    split: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class Format:
    """One annotation format.

    `reader(files, columns)` reads the format's files (train, val, test first) into raw rows; `columns` only
    matters to the generic CSV. `files` are lower-case glob patterns of its file names, looked for in a folder
    and then in `subfolders`; with `named`, such a name alone identifies the format, else the first line must
    pass `sniff` too. `centers` are the bin centres of its vote columns (None: a scalar MOS, or the generic
    CSV's own); `score_range` its valid MOS range (None: inferred from the data); `acc_threshold` the binary
    accuracy threshold (None: the middle of the score range). With `split_lists`, train/val/test id lists next
    to the annotation file give the split. The `generic` format is sniffed last: any CSV looks like it.
    """

    name: str
    reader: Callable[[list[Path], CsvColumns], Rows]
    sniff: Callable[[str], bool]
    hint: str  # how it is recognised, for error messages
    files: tuple[str, ...] = ()
    named: bool = True
    subfolders: tuple[str, ...] = ()
    image_folders: tuple[str, ...] = ("images",)
    centers: tuple[float, ...] | None = None
    score_range: tuple[float, float] | None = None
    acc_threshold: float | None = None
    split_lists: bool = False
    generic: bool = False

    def matches_name(self, path: Path) -> bool:
        return any(fnmatch.fnmatch(path.name.lower(), pattern) for pattern in self.files)

    def files_in(self, folder: Path) -> list[Path]:
        """Its files directly in `folder`, else in the first of `subfolders` holding some; train first."""
        order = {"train": 0, "val": 1, "test": 2}  # then the rest
        for where in (folder, *(folder / sub for sub in self.subfolders)):
            found = (
                [p for p in where.iterdir() if p.is_file() and self.matches_name(p)] if where.is_dir() else []
            )
            if found:
                return sorted(found, key=lambda p: (order.get(split_from_name(p) or "", 3), p.name))
        return []

    def annotation_files(self, path: Path) -> list[Path]:
        """The files to read for `path`: the file itself, or the format's files in the folder."""
        if path.is_file():
            return [path]
        if found := self.files_in(path):
            return found
        if not self.files:
            raise AnnotationError(
                f"{path}: a {self.name} annotation is read from one file; pass the file itself"
            )
        where = " or ".join(["this folder", *(f"{sub}/" for sub in self.subfolders)])
        raise AnnotationError(
            f"{path}: no {' / '.join(self.files)} in {where}; pass the annotation file itself"
        )

    def holds(self, folder: Path) -> bool:
        """Whether `folder` holds this format's files."""
        return any(self.named or self.sniff(first_line(f)) for f in self.files_in(folder))


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add a format to `FORMATS`; it is then detected, read and tested like the others."""
    if fmt.name in FORMATS:
        raise ValueError(f"annotation format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def _group_column(header: list[str], words: tuple[str, ...]) -> str | None:
    """The first column whose name contains one of `words` (ignoring case)."""
    return next((c for c in header if any(w in c.lower() for w in words)), None)


def _file_by_file(read: Callable[[Path, str], tuple[pd.DataFrame, list[dict]]], labels=(), by_name=True):
    """A reader that reads each file with `read(file, split)` -> (block, problems), the split given by the
    file's name (train when none); `labels` name the vote columns in messages."""

    def reader(files: list[Path], columns: CsvColumns) -> Rows:
        blocks, problems, sources = [], [], []
        for file in files:
            split = split_from_name(file) or "train"
            sources.append(f"{file.name} -> {split}")
            raw, bad = read(file, split)
            blocks.append(raw)
            problems += bad
        split_source = f"file names ({', '.join(sources)})" if by_name else "none: every row is train"
        return Rows(blocks, problems, split_source, list(labels))

    return reader


# ------------------------------------------------------------------------------------------ AVA

_AVA_COLUMNS = ("index", "image_id", *(f"r{k}" for k in range(1, 11)), "tag1", "tag2", "challenge")
# AVA's scale (votes for ratings 1..10), also that of the ELTA / TANet CSVs, which hold AVA in another layout
_AVA_SCALE = dict(centers=tuple(float(k) for k in range(1, 11)), score_range=(1.0, 10.0), acc_threshold=5.0)


def _read_ava(file: Path, split: str) -> tuple[pd.DataFrame, list[dict]]:
    """AVA.txt: index, image id, 10 vote counts (ratings 1..10), semantic tag 1, tag 2, challenge id."""
    what = "index, image id, 10 vote counts, 2 semantic tags, challenge id"
    table, bad = whitespace_table(file, _AVA_COLUMNS, what)
    group = table["tag1"].where(table["tag1"] != "0", "")
    return block(file.name, table, table["image_id"], group=group, votes=_AVA_COLUMNS[2:12]), bad


def _ava_line(line: str) -> bool:
    fields = line.split()
    return "," not in line and len(fields) == len(_AVA_COLUMNS) and all(is_number(f) for f in fields)


register_format(
    Format(
        name="ava",
        reader=_file_by_file(_read_ava, [f"vote count for rating {k}" for k in range(1, 11)], by_name=False),
        sniff=_ava_line,
        hint="AVA.txt, or lines of 15 numbers",
        files=("ava.txt",),
        split_lists=True,
        **_AVA_SCALE,
    )
)

# ------------------------------------------------------------------------------------------ ELTA / TANet CSV

_ELTA_VOTES = tuple(f"score{k}" for k in range(2, 12))


def _read_elta_csv(file: Path, split: str) -> tuple[pd.DataFrame, list[dict]]:
    """ELTA/TANet CSVs: image_id, score2..score11 (vote counts for ratings 1..10), optional score and tags."""
    header, table, bad = read_csv(file)
    image = "image_id" if "image_id" in header else pick_column(header, IMAGE_NAMES)
    require(file, header, [image or "image_id", *_ELTA_VOTES], "ELTA CSV (image_id, score2..score11)")
    tag = _group_column(header, ("tag", "semantic"))
    group = table[tag].where(~table[tag].map(lambda v: is_number(v) and float(v) == 0), "") if tag else ""
    return block(file.name, table, table[image], split=split, group=group, votes=_ELTA_VOTES), bad


register_format(
    Format(
        name="elta-csv",
        reader=_file_by_file(_read_elta_csv, _ELTA_VOTES),
        sniff=lambda line: all(name in header_cells(line) for name in _ELTA_VOTES),
        hint="train/val/test.csv with columns score2..score11",
        files=("train.csv", "val.csv", "validation.csv", "test.csv"),
        named=False,  # any CSV may be called train.csv
        **_AVA_SCALE,
    )
)

# ------------------------------------------------------------------------------------------ PARA

_PARA_CENTERS = tuple(1.0 + 0.5 * k for k in range(9))
_PARA_VOTES = tuple(f"aestheticScore_{c:.1f}" for c in _PARA_CENTERS)


def _read_para(file: Path, split: str) -> tuple[pd.DataFrame, list[dict]]:
    """PARA GIAA: imageName, sessionId, aestheticScore_1.0..5.0 (votes or proportions), _std, semantic."""
    header, table, bad = read_csv(file)
    require(file, header, ["imageName", "sessionId", *_PARA_VOTES], "PARA GIAA")
    session = table["sessionId"].str.strip()
    empty = session == ""
    bad += [problem(file.name, line, "empty sessionId") for line in table.loc[empty, "_line"]]
    table, session = table.loc[~empty], session.loc[~empty]
    name = session + "/" + table["imageName"].str.strip().map(file_name)
    semantic = _group_column(header, ("semantic", "scene"))
    group = table[semantic] if semantic else ""
    std = table["aestheticScore_std"] if "aestheticScore_std" in header else ""
    return block(file.name, table, table["imageName"], name, split, group, std, votes=_PARA_VOTES), bad


register_format(
    Format(
        name="para",
        reader=_file_by_file(_read_para, _PARA_VOTES),
        sniff=lambda line: {"imageName", "aestheticScore_mean"} <= set(header_cells(line)),
        hint="PARA-Giaa*.csv, or columns imageName + aestheticScore_mean",
        files=("para-giaa*.csv",),
        subfolders=("annotation",),
        image_folders=("imgs", "images"),
        centers=_PARA_CENTERS,
        score_range=(1.0, 5.0),
    )
)

# ------------------------------------------------------------------------------------------ AADB


def _read_aadb(file: Path, split: str) -> tuple[pd.DataFrame, list[dict]]:
    """AADB: `name score` per line, score in [0, 1]; one file per split."""
    table, bad = whitespace_table(file, ("name", "score"), "image name, score")
    return block(file.name, table, table["name"], split=split, mos=table["score"]), bad


def _aadb_line(line: str) -> bool:
    fields = line.split()
    return "," not in line and len(fields) == 2 and is_number(fields[1])


register_format(
    Format(
        name="aadb",
        reader=_file_by_file(_read_aadb),
        sniff=_aadb_line,
        hint="imgList*Regression_score.txt, or lines 'name score'",
        files=("imglist*regression_score.txt",),
        image_folders=("datasetImages_warp256", "images"),
        score_range=(0.0, 1.0),
    )
)

# ------------------------------------------------------------------------------------------ KonIQ-10k

_KONIQ_VOTES = tuple(f"c{k}" for k in range(1, 6))


def _read_koniq(files: list[Path], columns: CsvColumns) -> Rows:
    """KonIQ-10k: image_name, c1..c5 (counts of ratings 1..5), c_total, MOS, SD, MOS_zscore[, set]."""
    # koniq10k_distributions_sets.csv adds the official split in a `set` column; prefer it.
    with_sets = [f for f in files if "set" in header_cells(first_line(f))]
    file = (with_sets or files)[0]
    if len(files) > 1:
        logger.info("%s: reading %s (of %s)", file.parent, file.name, [f.name for f in files])
    header, table, problems = read_csv(file)
    require(file, header, ["image_name", *_KONIQ_VOTES], "KonIQ-10k (image_name, c1..c5, MOS, SD)")
    std = table["SD"] if "SD" in header else ""
    split = table["set"] if "set" in header else "train"
    raw = block(file.name, table, table["image_name"], split=split, std=std, votes=_KONIQ_VOTES)
    split_source = "split column 'set'" if "set" in header else "none: every row is train"
    return Rows([raw], problems, split_source, list(_KONIQ_VOTES))


def _koniq_header(line: str) -> bool:
    header = header_cells(line)
    return all(c in header for c in _KONIQ_VOTES) and pick_column(header, ["MOS"]) is not None


register_format(
    Format(
        name="koniq",
        reader=_read_koniq,
        sniff=_koniq_header,
        hint="koniq10k_*.csv, or columns c1..c5 + MOS",
        files=("koniq10k_*.csv",),
        image_folders=("1024x768", "images"),
        centers=tuple(float(k) for k in range(1, 6)),
        score_range=(1.0, 5.0),
    )
)

# ------------------------------------------------------------------------------------------ generic CSV

_MOS_NAMES = ("mos", "MOS", "score", "mos_score", "mean_score")
# the optional columns of a generic CSV: the names recognised, and the value of a row when there is none
_OPTIONAL = {
    "std": (("std", "sd", "SD", "mos_std"), ""),
    "split": (("split", "set"), "train"),
    "group": (("group", "tag", "scene", "category"), ""),
}


def _explicit_or_pick(
    file: Path, header: list[str], explicit: str | None, names: tuple, role: str
) -> str | None:
    if explicit is None:
        return pick_column(header, names)
    if explicit not in header:
        raise AnnotationError(
            f"{file}: no column {explicit!r} (asked for as the {role} column); header is {list(header)}"
        )
    return explicit


def _read_generic_csv(files: list[Path], columns: CsvColumns) -> Rows:
    """A CSV with an image column and a MOS column (or vote/probability columns); names configurable."""
    path = files[0]
    header, table, problems = read_csv(path)
    image = _explicit_or_pick(path, header, columns.image, IMAGE_NAMES, "image")
    if image is None:
        raise AnnotationError(
            f"{path}: no image column (looked for {', '.join(IMAGE_NAMES)}); header is {list(header)}. "
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
            dmos = pick_column(header, ["dmos"])
            hint = " A DMOS column (lower is better) is not read as MOS; convert it first." if dmos else ""
            raise AnnotationError(
                f"{path}: no MOS column (looked for {', '.join(_MOS_NAMES)}); header is {list(header)}."
                f"{hint} Name it with CsvColumns(mos=...) or give vote columns with CsvColumns(dist=[...])."
            )
    found = {
        role: _explicit_or_pick(path, header, getattr(columns, role), names, role)
        for role, (names, _) in _OPTIONAL.items()
    }
    cells = {role: table[found[role]] if found[role] else none for role, (_, none) in _OPTIONAL.items()}
    raw = block(path.name, table, table[image], mos=table[mos] if mos else None, votes=dist, **cells)
    split = found["split"]
    split_source = f"split column {split!r}" if split else "none: every row is train"
    return Rows([raw], problems, split_source, dist)


def _generic_header(line: str) -> bool:
    header = header_cells(line)
    return pick_column(header, IMAGE_NAMES) is not None and pick_column(header, _MOS_NAMES) is not None


register_format(
    Format(
        name="csv",
        reader=_read_generic_csv,
        sniff=_generic_header,
        hint="a CSV with an image column and a MOS column (TAD66K, pyiqa meta-info)",
        generic=True,
    )
)

# ------------------------------------------------------------------------------------------ detection


def _tried() -> str:
    return "; ".join(f"{fmt.name}: {fmt.hint}" for fmt in FORMATS.values())


def detect_format(path: str | Path) -> str:
    """The annotation format of a file or folder, from file names first, then from the first line."""
    path = Path(path)
    names = ", ".join(FORMATS)
    if path.is_dir():
        found = [fmt.name for fmt in FORMATS.values() if fmt.holds(path)]
        # AVA's split lists may be CSVs that look like another format: the format that reads lists wins.
        with_lists = [name for name in found if FORMATS[name].split_lists]
        if with_lists or len(found) == 1:
            return (with_lists or found)[0]
        entries = sorted(p.name for p in path.iterdir())
        more = f", … ({len(entries)} entries)" if len(entries) > _MAX_LISTED else ""
        shown = ", ".join(entries[:_MAX_LISTED]) + more
        what = f"it matches several formats {found}" if found else "no known annotation file is in it"
        raise AnnotationError(
            f"{path}: cannot tell the annotation format: {what}. Tried {_tried()}. The folder holds: {shown}. "
            f"Pass the annotation file itself or --format (one of {names})."
        )
    if not path.is_file():
        raise AnnotationError(f"{path}: no such file or folder")
    by_name = next((fmt.name for fmt in FORMATS.values() if fmt.named and fmt.matches_name(path)), None)
    if by_name:
        return by_name
    line = first_line(path)
    for fmt in sorted(FORMATS.values(), key=lambda f: f.generic):
        if fmt.sniff(line):
            return fmt.name
    raise AnnotationError(
        f"{path}: cannot tell the annotation format. Tried {_tried()}. First line: {line[:200]!r}. "
        f"Pass --format (one of {names}) and, for a generic CSV, the column names."
    )


# ------------------------------------------------------------------------------------------ reading text


def problem(file: str, row: int, reason: str) -> dict:
    return {"file": file, "row": int(row), "reason": reason}


def file_name(image_id: str) -> str:
    """The image file name for an id: the id itself when it has an image extension, else `<id>.jpg`."""
    return image_id if os.path.splitext(image_id)[1].lower() in IMAGE_EXTENSIONS else f"{image_id}.jpg"


def split_from_name(path: Path) -> str | None:
    """train/val/test from words in a file name (PARA-GiaaTrain, imgListValidationRegression_score, test)."""
    words = {w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", path.stem)}
    found = {SPLIT_VALUES[w] for w in words if w in SPLIT_VALUES}
    return found.pop() if len(found) == 1 else None


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def first_line(path: Path) -> str:
    """The first non-blank line of a text file."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for line in handle:
                if line.strip():
                    return line.rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not a UTF-8 text file ({err})") from err
    raise AnnotationError(f"{path}: the file is empty")


def split_lines(path: Path) -> list[tuple[int, list[str]]]:
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


def header_cells(line: str) -> list[str]:
    """The cells of one CSV line (a header), stripped."""
    return [cell.strip() for cell in next(csv.reader([line], delimiter=_delimiter(line)))]


def read_csv(path: Path) -> tuple[list[str], pd.DataFrame, list[dict]]:
    """Header, data rows as strings (plus column `_line`, 1-based), and problems for rows with a wrong field
    count. The header is line 1 when the file has no leading blank lines."""
    header: list[str] | None = None
    rows, lines, problems = [], [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=_delimiter(first_line(path)))
            end_of_previous = 0
            for record in reader:
                start, end_of_previous = end_of_previous + 1, reader.line_num
                if not any(cell.strip() for cell in record):
                    continue
                if header is None:
                    header = [cell.strip() for cell in record]
                elif len(record) != len(header):
                    reason = f"{len(record)} fields, expected {len(header)} (one per header column)"
                    problems.append(problem(path.name, start, reason))
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
    table = pd.DataFrame(rows, columns=header, dtype=str)
    table["_line"] = np.asarray(lines, dtype=np.int64)
    return header, table, problems


def pick_column(header: Sequence[str], names: Sequence[str]) -> str | None:
    """The first of `names` in the header, matched exactly first, then ignoring case."""
    lower = {column.lower(): column for column in reversed(header)}  # the first of equal names wins
    exact = next((name for name in names if name in header), None)
    return exact or next((lower[name.lower()] for name in names if name.lower() in lower), None)


def require(path: Path, header: Sequence[str], needed: Sequence[str], what: str) -> None:
    missing = [name for name in needed if name not in header]
    if missing:
        raise AnnotationError(
            f"{path}: missing column(s) {missing} of the {what} layout; header is {list(header)}. "
            "Pass the right --format (or CsvColumns for a generic CSV)."
        )


def block(
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
    """One file's rows in the common raw layout (all strings); `table` has the `_line` column of read_csv."""
    image_id = image_id.astype(str).str.strip()
    raw = pd.DataFrame(
        {
            "source": source,
            "line": table["_line"].to_numpy(),
            "image_id": image_id.to_numpy(),
            "name": (image_id.map(file_name) if name is None else name).to_numpy(),
        }
    )
    for column, value in (("split", split), ("group", group), ("std", std)):
        raw[column] = value.astype(str).str.strip().to_numpy() if isinstance(value, pd.Series) else value
    if mos is not None:
        raw["mos"] = mos.to_numpy()
    for k, column in enumerate(votes, start=1):
        raw[f"v{k}"] = table[column].to_numpy()
    return raw


def whitespace_table(path: Path, columns: Sequence[str], what: str) -> tuple[pd.DataFrame, list[dict]]:
    """A whitespace-separated file with `len(columns)` fields a line (AVA.txt, AADB's lists) as strings, with
    `_line`; lines with another field count are problems."""
    records, lines, problems = [], [], []
    for line_no, fields in split_lines(path):
        if len(fields) == len(columns):
            records.append(fields)
            lines.append(line_no)
        else:
            reason = f"{len(fields)} fields, expected {len(columns)} ({what})"
            problems.append(problem(path.name, line_no, reason))
    table = pd.DataFrame(records, columns=list(columns), dtype=str)
    table["_line"] = np.asarray(lines, dtype=np.int64)
    return table, problems
