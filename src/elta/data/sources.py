"""Where a collection's images come from: a stream of keyed items, in a fixed order, never all in memory.

A :class:`Collection` reads any mix of

- image files, and folders (recursive, hidden entries left out, each folder's entries in sorted order);
- path lists: ``.txt`` / ``.lst`` (a path a line), ``.csv`` and ``.parquet`` (the ``column`` named, else a
  column ``path``, else the only column); relative paths are relative to the list's folder;
- WebDataset tar shards (``.tar``, ``.tar.gz``, ``.tgz``; local paths or glob patterns such as
  ``shards/*.tar``), read as a stream with :mod:`tarfile`. Members are grouped into samples by WebDataset's
  rule: the key is the member's path up to the first dot of its file name (``a/000123.jpg`` → ``a/000123``);
  a sample's image is its first member with an image suffix.

and yields one :class:`Item` per image, keyed by its path (files) or its sample key (tars). What cannot be an
image is an item with an ``error`` (a sample without an image, an empty or truncated shard, a list line that
names no image), so the job that scores the stream reports it in its row and continues. Iterating again starts
over and gives the same items in the same order: loader processes each iterate the collection themselves.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from elta.data.images import IMAGE_EXTENSIONS, LIST_SUFFIXES
from elta.errors import ConfigError, ImageLoadError, UnavailableError

__all__ = ["Collection", "Item", "TAR_SUFFIXES", "key_digest"]

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TABLE_SUFFIXES = frozenset({".csv", ".parquet"})
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Item:
    """One entry of a collection: ``data`` is the image's file or its encoded bytes (a tar member), None when
    ``error`` says why there is no image. ``tar`` names the shard a sample came from."""

    key: str
    data: Path | bytes | None
    error: str = ""
    tar: str = ""

    def scoring_input(self) -> Path | bytes | ImageLoadError:
        """What the model is given: the file or bytes, or the reason there is nothing to score."""
        return ImageLoadError(self.key, self.error) if self.error else self.data


def key_digest(key: str) -> int:
    """A stable 64-bit digest of a key (the same on every machine and Python process)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def _is_tar(path: str | Path) -> bool:
    return str(path).lower().endswith(TAR_SUFFIXES)


def _is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


class Collection:
    """The images named by ``inputs`` (files, folders, path lists, tar shards or glob patterns of them), in
    order; ``column`` is the path column of .csv / .parquet lists."""

    def __init__(self, inputs: Sequence[str | Path], column: str | None = None) -> None:
        if isinstance(inputs, (str, Path)):
            inputs = [inputs]
        self.inputs = [str(entry) for entry in inputs]
        self.column = column
        self.entries = self._expand()

    def _expand(self) -> list[str]:
        """Inputs with glob patterns replaced by their sorted matches; a missing path is an error now."""
        entries = []
        for entry in self.inputs:
            if _GLOB_CHARS & set(entry) and not Path(entry).exists():
                matches = sorted(glob.glob(entry))
                if not matches:
                    raise ConfigError(f"{entry}: the pattern matches no file")
                entries += matches
                continue
            path = Path(entry)
            if not path.exists():
                raise ConfigError(f"{entry}: no such file or folder")
            if not (path.is_dir() or _is_tar(path) or _is_image(path)):
                if path.suffix.lower() not in LIST_SUFFIXES | TABLE_SUFFIXES:
                    raise ConfigError(
                        f"{entry}: not a folder, an image, a path list (.txt, .lst, .csv, .parquet) "
                        f"or a tar shard ({', '.join(TAR_SUFFIXES)})"
                    )
            entries.append(entry)
        return entries

    @property
    def has_tars(self) -> bool:
        return any(_is_tar(entry) for entry in self.entries)

    def __iter__(self) -> Iterator[Item]:
        for entry in self.entries:
            path = Path(entry)
            if path.is_dir():
                yield from _folder_items(path)
            elif _is_tar(path):
                yield from _tar_items(path)
            elif path.suffix.lower() in LIST_SUFFIXES:
                yield from _list_items(path)
            elif path.suffix.lower() in TABLE_SUFFIXES:
                yield from _table_items(path, self.column)
            else:
                yield Item(str(path), path)

    def count(self) -> int:
        """The number of items (a pass over the collection: cheap for files, a read for tars)."""
        return sum(1 for _ in self)


def _folder_items(folder: Path) -> Iterator[Item]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for name in sorted(filenames):
            if not name.startswith(".") and _is_image(name):
                yield Item(str(base / name), base / name)


def _path_item(entry: str, where: str, root: Path) -> Iterator[Item]:
    """The item(s) of one line or cell of a path list: an image, a folder's images, or an error row."""
    path = Path(entry)
    if not path.is_absolute():
        path = root / path
    if path.is_dir():
        yield from _folder_items(path)
    elif _is_image(path):
        yield Item(str(path), path)
    else:
        yield Item(str(path), None, f"{where}: {entry!r} is neither a folder nor an image file")


def _list_items(list_file: Path) -> Iterator[Item]:
    with open(list_file, encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            if entry := line.strip():
                yield from _path_item(entry, f"{list_file} line {line_no}", list_file.parent)


def _pick_column(columns: Sequence[str], column: str | None, table: Path) -> str:
    if column is not None:
        if column not in columns:
            raise ConfigError(f"{table}: no column {column!r} (columns: {', '.join(columns)}); set --column")
        return column
    if "path" in columns:
        return "path"
    if len(columns) == 1:
        return columns[0]
    raise ConfigError(f"{table}: which column holds the paths? ({', '.join(columns)}); set --column")


def _table_items(table: Path, column: str | None) -> Iterator[Item]:
    if table.suffix.lower() == ".csv":
        with open(table, encoding="utf-8-sig", newline="") as handle:
            rows = csv.reader(handle)
            header = next(rows, [])
            at = header.index(_pick_column(header, column, table))
            for row_no, row in enumerate(rows, start=2):
                cell = row[at].strip() if at < len(row) else ""
                if cell:
                    yield from _path_item(cell, f"{table} row {row_no}", table.parent)
        return
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise UnavailableError(
            f"{table}: Parquet path lists need pyarrow (pip install 'elta[parquet]')"
        ) from exc
    parquet = pq.ParquetFile(table)
    name = _pick_column(parquet.schema_arrow.names, column, table)
    row = 0
    for batch in parquet.iter_batches(batch_size=8192, columns=[name]):
        for cell in batch.column(0).to_pylist():
            row += 1
            if cell is None or not str(cell).strip():
                yield Item(f"{table} row {row}", None, f"{table} row {row}: empty path")
            else:
                yield from _path_item(str(cell).strip(), f"{table} row {row}", table.parent)


def _sample_key(member: str) -> tuple[str, str]:
    """WebDataset's (key, suffix) of a member path: ``a/b.c.jpg`` → (``a/b``, ``c.jpg``)."""
    folder, _, name = member.rpartition("/")
    stem, dot, suffix = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix if dot else ""


def _sample(key: str, members: dict[str, bytes], tar: Path) -> Item:
    for suffix, data in members.items():
        if f".{suffix.rsplit('.', 1)[-1].lower()}" in IMAGE_EXTENSIONS:
            return Item(key, data, tar=str(tar))
    found = ", ".join(f".{s}" if s else "(no suffix)" for s in members)
    return Item(key, None, f"{tar}: sample {key!r} holds no image (members: {found})", tar=str(tar))


def _tar_items(tar: Path) -> Iterator[Item]:
    """The samples of a WebDataset shard, streamed; an empty or broken shard is an error item."""
    samples, key, members = 0, None, {}
    try:
        with tarfile.open(tar, mode="r|*") as stream:
            for member in stream:
                if not member.isfile():
                    continue
                name = member.name.removeprefix("./")
                if Path(name).name.startswith("."):
                    continue
                member_key, suffix = _sample_key(name)
                if member_key != key and key is not None:
                    samples += 1
                    yield _sample(key, members, tar)
                    members = {}
                key = member_key
                handle = stream.extractfile(member)
                members[suffix] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        if key is not None:
            yield _sample(key, members, tar)  # what was read before the break
        yield Item(str(tar), None, f"{tar}: broken tar shard after {samples} samples ({exc})", tar=str(tar))
        return
    if key is not None:
        yield _sample(key, members, tar)
    else:
        yield Item(str(tar), None, f"{tar}: empty shard (no samples)", tar=str(tar))
