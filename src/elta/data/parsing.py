"""Reading annotation text: CSV and whitespace-separated files with their line numbers, into raw rows.

Every format reader (elta.data.formats) turns its files into `Rows`: one DataFrame of strings per file in a
common raw layout, plus the problems of rows it could not even split. elta.data.annotations validates them.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from elta.data.images import IMAGE_EXTENSIONS
from elta.errors import AnnotationError

__all__ = [
    "IMAGE_NAMES",
    "SPLIT_VALUES",
    "Rows",
    "block",
    "by_split",
    "file_name",
    "first_line",
    "header_cells",
    "is_number",
    "pick_column",
    "problem",
    "read_csv",
    "require",
    "split_from_name",
    "split_lines",
    "whitespace_table",
]

IMAGE_NAMES = ("image", "image_id", "image_name", "img_name", "name", "filename", "file", "path")
SPLIT_VALUES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


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


def by_split(files: list[Path]) -> list[Path]:
    """Files ordered train, val, test, then the rest."""
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(files, key=lambda p: (order.get(split_from_name(p) or "", 3), p.name))


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
    rows: list[list[str]] = []
    lines: list[int] = []
    problems: list[dict] = []
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
    table = pd.DataFrame(rows, columns=header, dtype=str) if rows else pd.DataFrame(columns=header, dtype=str)
    table["_line"] = np.asarray(lines, dtype=np.int64)
    return header, table, problems


def pick_column(header: Sequence[str], names: Sequence[str]) -> str | None:
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
        if len(fields) != len(columns):
            problems.append(
                problem(path.name, line_no, f"{len(fields)} fields, expected {len(columns)} ({what})")
            )
            continue
        records.append(fields)
        lines.append(line_no)
    table = pd.DataFrame(records, columns=list(columns), dtype=str)
    table["_line"] = np.asarray(lines, dtype=np.int64)
    return table, problems
