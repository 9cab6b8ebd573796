"""Score a collection at scale: streamed, resumable, sharded, then summarised and curated.

:func:`score_collection` scores a :class:`~elta.data.sources.Collection` through the one
:class:`~elta.engine.predictor.Predictor` and writes the rows as they come, in numbered part files (each
written atomically) under ``OUT.parts/``; memory stays flat in the number of images. When the stream ends the
parts are joined, in input order, into ``OUT`` (.parquet, .csv, .jsonl or .json) and the folder is removed.

- Resume: a killed run (SIGKILL included) continues from its parts. A part's name holds the stream positions it
  covers, so the parts alone say where to continue; the folder's ``manifest.json`` (written once, before any
  part) holds the job's settings, and resuming with other settings is refused. A part either exists whole or
  not at all, so every input ends up in the output exactly once.
- Shards: ``Shard(i, n)`` scores the items whose key digest is i modulo n (the same key always falls in the same
  shard, so duplicates are found within one), into ``OUT`` named ``stem.shard-i-of-n.suffix`` with an ``index``
  column (the item's position in the whole collection); :func:`merge_shards` joins the n parts in input order
  into what one process would have written.
- Duplicate keys: the first occurrence is scored, a later one is an error row (a set of 64-bit key digests is
  the one thing that grows with the collection: about 70 bytes an image).
- :func:`finish` writes the summary (``stem.summary.json``: counts, failure reasons, score histogram,
  percentiles, the selection), ``stem.png`` (the histogram with the tail cut-offs marked) and, with a
  :class:`Selection`, ``stem.selected.csv`` and the selected images copied or linked into a folder.
"""

from __future__ import annotations

import heapq
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from elta.data.sources import Collection, Item, key_digest
from elta.engine.predictor import Predictions, Predictor, score_format, write_scores
from elta.errors import ConfigError, RunExistsError
from elta.progress import progress_bar
from elta.utils import atomic_write, atomic_write_text

__all__ = [
    "DUPLICATE",
    "Selection",
    "Shard",
    "finish",
    "merge_shards",
    "read_frames",
    "score_collection",
    "shard_output",
    "write_frames",
]

log = logging.getLogger(__name__)

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
CHUNK_ROWS = 4096  # rows a part file holds (rounded up to whole batches)
DUPLICATE = "duplicate key (an earlier item has the same key; it is scored once)"
_PART = re.compile(r"part-(\d{12})-(\d{12})\.(parquet|csv|jsonl)$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): the items whose key digest is ``index`` modulo ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index}/{self.count}: expected I/N with 0 ≤ I < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """From ``I/N`` (``--shard 0/4``)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise ConfigError(f"--shard {text}: expected I/N, e.g. 0/4 for the first of four shards")
        return cls(int(match[1]), int(match[2]))

    def owns(self, key: str) -> bool:
        return self.count == 1 or key_digest(key) % self.count == self.index


def shard_output(out: str | Path, shard: Shard) -> Path:
    """Where a shard writes: ``scores.parquet`` → ``scores.shard-0-of-2.parquet`` (``out`` for one shard)."""
    out = Path(out)
    if shard.count == 1:
        return out
    return out.with_name(f"{out.stem}.shard-{shard.index}-of-{shard.count}{out.suffix}")


@dataclass(frozen=True)
class _Selected:
    """The (index in the collection, item) pairs of one shard from stream position ``start`` on; re-iterable
    and picklable, so loader processes can iterate it (as :meth:`inputs`) themselves."""

    collection: Collection
    shard: Shard
    start: int = 0

    def __iter__(self) -> Iterator[tuple[int, Item]]:
        owned = ((i, item) for i, item in enumerate(self.collection) if self.shard.owns(item.key))
        return itertools.islice(owned, self.start, None)

    def inputs(self) -> _Inputs:
        return _Inputs(self)


@dataclass(frozen=True)
class _Inputs:
    selected: _Selected

    def __iter__(self) -> Iterator:
        return (item.scoring_input() for _, item in self.selected)


# --- part files ----------------------------------------------------------------------------------------


def _part_suffix(out: Path) -> str:
    suffix = score_format(out)
    return ".jsonl" if suffix == ".json" else suffix


def _parts(folder: Path) -> list[tuple[int, int, Path]]:
    """(start, stop, path) of the finished parts, in order; they must tile 0..stop without a gap."""
    found = sorted(
        (int(m[1]), int(m[2]), folder / m[0]) for name in os.listdir(folder) if (m := _PART.fullmatch(name))
    )
    at = 0
    for start, stop, path in found:
        if start != at:
            raise ConfigError(
                f"{folder}: part files do not follow each other at {path.name}; remove the folder"
            )
        at = stop
    return found


def _manifest(collection: Collection, predictor: Predictor, shard: Shard, out: Path, checkpoint: str) -> dict:
    return {
        "inputs": collection.inputs,
        "column": collection.column,
        "shard": [shard.index, shard.count],
        "format": _part_suffix(out),
        "checkpoint": str(checkpoint),
        "calibrated": predictor.calibrated,
        "batch_size": predictor.runtime.batch_size,
        "precision": str(predictor.runtime.precision),
    }


def _open_parts(folder: Path, manifest: dict, resume: bool) -> list[tuple[int, int, Path]]:
    """The parts a run continues from (none for a new run); a stale or foreign folder is refused."""
    marker = folder / "manifest.json"
    if folder.exists() and not resume:
        raise RunExistsError(
            f"{folder} holds an unfinished run: continue it with --resume, or remove the folder to start over"
        )
    if resume and marker.is_file():
        saved = json.loads(marker.read_text())
        changed = [key for key in manifest if saved.get(key) != manifest[key]]
        if changed:
            details = "; ".join(f"{k}: {saved.get(k)!r} then, {manifest[k]!r} now" for k in changed)
            raise ConfigError(f"--resume: {folder} was started with other settings ({details})")
        for stale in folder.glob(".*.tmp"):  # a part being written when the run was killed
            stale.unlink()
        return _parts(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(manifest, indent=1))
    return []


# --- reading and writing score files -------------------------------------------------------------------


def read_frames(path: str | Path, rows: int = 65536) -> Iterator[pd.DataFrame]:
    """A scores file (.parquet, .csv, .jsonl or .json, as written by elta) in frames of about ``rows`` rows,
    with its values as written: numbers as float64 (NaN where empty), ``path`` and ``error`` as text."""
    path = Path(path)
    suffix = score_format(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
            yield batch.to_pandas()
        return
    if suffix == ".csv":
        chunks = pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=rows)
        for chunk in chunks:
            yield _typed(chunk)
        return
    if suffix == ".json":
        yield _typed(pd.DataFrame.from_records(json.loads(path.read_text())))
        return
    with open(path, encoding="utf-8") as handle:
        while lines := list(itertools.islice(handle, rows)):
            yield _typed(pd.DataFrame.from_records([json.loads(line) for line in lines]))


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for column in frame.columns:
        if column in ("path", "error"):
            frame[column] = frame[column].fillna("").astype(str)
        elif column == "index":
            frame[column] = frame[column].astype(np.int64)
        else:
            frame[column] = pd.to_numeric(frame[column].replace({"": None}), errors="raise").astype(float)
    return frame


def write_frames(frames: Iterable[pd.DataFrame], out: str | Path) -> Path:
    """Write frames one after another into one scores file (by the suffix of ``out``), atomically; memory
    holds one frame at a time."""
    suffix = score_format(out)

    def write(fh) -> None:
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            writer = schema = None
            for frame in frames:
                table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
                if writer is None:
                    schema = table.schema
                    writer = pq.ParquetWriter(fh, schema)
                writer.write_table(table)
            if writer is not None:
                writer.close()
            return
        first = True
        if suffix == ".json":
            fh.write(b"[")
        for frame in frames:
            if suffix == ".csv":
                fh.write(frame.to_csv(index=False, header=first).encode("utf-8"))
            else:
                records = frame.replace({np.nan: None}).to_dict("records")
                sep = ",\n" if suffix == ".json" else "\n"
                text = sep.join(json.dumps(r) for r in records)
                if text:
                    lead = "" if (first or suffix == ".jsonl") else ",\n"
                    fh.write((lead + text + ("\n" if suffix == ".jsonl" else "")).encode("utf-8"))
            first = first and suffix == ".json" and frame.empty  # a JSON list needs a comma after a record
        if suffix == ".json":
            fh.write(b"]\n")

    return atomic_write(out, write)


# --- scoring -----------------------------------------------------------------------------------------


def _frame(positions: list[tuple[int, Item]], preds: Predictions, seen: set[int]) -> pd.DataFrame:
    """The rows of one scored run of items; a key seen before becomes an error row."""
    errors = list(preds.errors)
    duplicate = np.zeros(len(errors), dtype=bool)
    for row, (_, item) in enumerate(positions):
        digest = key_digest(item.key)
        if digest in seen:
            duplicate[row] = True
            errors[row] = f"{item.key}: {DUPLICATE}"
        else:
            seen.add(digest)
    frame = preds.table([item.key for _, item in positions], index=[index for index, _ in positions])
    frame["error"] = errors
    numbers = [c for c in frame.columns if c not in ("path", "index", "error")]
    frame.loc[duplicate, numbers] = np.nan
    return frame


def score_collection(
    predictor: Predictor,
    collection: Collection,
    out: str | Path,
    *,
    shard: Shard = Shard(),
    resume: bool = False,
    checkpoint: str = "",
    chunk_rows: int = CHUNK_ROWS,
    progress: bool = False,
) -> Path:
    """Score ``collection`` (this process's ``shard`` of it) into ``out`` as described in the module docstring;
    returns the file written (``out`` itself for one shard). ``checkpoint`` names the model in the manifest."""
    out = Path(out)
    target = shard_output(out, shard)
    folder = target.with_name(target.name + ".parts")
    suffix = _part_suffix(out)
    if resume and target.is_file() and not folder.exists():
        log.info("%s is complete already (no unfinished parts beside it): nothing to resume", target)
        return target
    parts = _open_parts(folder, _manifest(collection, predictor, shard, out, checkpoint), resume)
    start = parts[-1][1] if parts else 0
    seen: set[int] = set()
    for _, _, path in parts:  # the keys already written, for the duplicate check
        for frame in read_frames(path):
            seen.update(key_digest(key) for key in frame["path"])
    if start:
        log.info("resuming %s: %d items done in %d parts", target, start, len(parts))
    batch = predictor.runtime.batch_size
    chunk = (
        max(1, math.ceil(chunk_rows / batch)) * batch
    )  # parts end on whole batches: resumes score the same
    selected = _Selected(collection, shard, start)
    items = iter(selected)
    total = collection.count() if progress and not collection.has_tars else None
    bar = progress_bar(desc="scoring", enabled=progress, total=total, unit="img", initial=start)
    pending: list[pd.DataFrame] = []
    at = start
    try:
        for positions, preds in predictor.predict_stream(selected.inputs()):
            first = at + sum(len(f) for f in pending)
            if positions[0] + start != first or positions[-1] - positions[0] + 1 != len(positions):
                raise RuntimeError(
                    f"scoring returned positions {positions[0]}… out of order (expected {first})"
                )
            rows = list(itertools.islice(items, len(positions)))
            pending.append(_frame(rows, preds, seen))
            bar.update(len(positions))
            if sum(len(f) for f in pending) >= chunk:
                at = _write_part(folder, at, pending, suffix)
                pending = []
        if pending:
            at = _write_part(folder, at, pending, suffix)
    finally:
        bar.close()
    keep_index = shard.count > 1
    done = _parts(folder)
    frames = (f if keep_index else f.drop(columns="index") for _, _, p in done for f in read_frames(p))
    write_frames(frames if done else [_empty_frame(predictor, keep_index)], target)
    shutil.rmtree(folder)
    return target


def _write_part(folder: Path, start: int, frames: list[pd.DataFrame], suffix: str) -> int:
    frame = pd.concat(frames, ignore_index=True)
    stop = start + len(frame)
    write_scores(frame, folder / f"part-{start:012d}-{stop:012d}{suffix}")
    return stop


def _empty_frame(predictor: Predictor, keep_index: bool) -> pd.DataFrame:
    k = predictor.num_bins
    columns = ["path", "score", "std", *(f"p{i + 1}" for i in range(k))]
    if predictor.calibrated:
        columns.append("score_uncalibrated")
    frame = pd.DataFrame({c: pd.Series(dtype=str if c == "path" else float) for c in columns})
    if keep_index:
        frame["index"] = pd.Series(dtype=np.int64)
    frame["error"] = pd.Series(dtype=str)
    return frame


def merge_shards(out: str | Path, count: int, rows: int = 65536) -> Path:
    """Join the ``count`` shard files of ``out`` (see :func:`shard_output`) into ``out``, in collection order:
    the rows one process would have written. The shard files are left in place."""
    out = Path(out)
    shards = [shard_output(out, Shard(i, count)) for i in range(count)]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise ConfigError(
            f"cannot merge {out}: shard files missing ({', '.join(missing)}); score those shards"
        )
    streams = [_rows(path) for path in shards]
    header = next(read_frames(shards[0], rows=1)).columns.drop("index")

    def frames() -> Iterator[pd.DataFrame]:
        merged = heapq.merge(*streams, key=lambda row: row[0])
        while block := list(itertools.islice(merged, rows)):
            yield pd.DataFrame([row[1] for row in block], columns=header)

    return write_frames(frames(), out)


def _rows(path: Path) -> Iterator[tuple[int, tuple]]:
    for frame in read_frames(path):
        index = frame.pop("index").to_numpy()
        yield from zip(index.tolist(), frame.itertuples(index=False, name=None), strict=True)


# --- summary and selection -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which scored images to keep: the ``top`` or ``bottom`` fraction (exact over the whole collection:
    k = ⌊fraction · N + ½⌋ of the N scored images, ties at the cut broken by the smaller key), then those with
    a score ≥ ``min_score``. ``copy_to`` receives the selected images (symbolic links with ``link``)."""

    top: float | None = None
    bottom: float | None = None
    min_score: float | None = None
    copy_to: str | None = None
    link: bool = False

    def __post_init__(self) -> None:
        if self.top is not None and self.bottom is not None:
            raise ConfigError("--top and --bottom: choose one")
        for name in ("top", "bottom"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ConfigError(f"--{name}: a fraction in (0, 100 %]; got {value:g}")
        if self.link and not self.copy_to:
            raise ConfigError("--link needs --copy-to DIR (the folder the links go into)")

    @property
    def active(self) -> bool:
        return self.top is not None or self.bottom is not None or self.min_score is not None

    @staticmethod
    def parse_fraction(text: str) -> float:
        """``5%`` or ``0.05`` → 0.05."""
        try:
            return float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
        except ValueError as exc:
            raise ConfigError(
                f"{text!r}: expected a percentage such as 5% (or a fraction such as 0.05)"
            ) from exc


def _select(out: Path, scores: np.ndarray, selection: Selection) -> pd.DataFrame:
    """The selected rows (rank, path, score), best first for --top / --min-score, lowest first for --bottom."""
    fraction = selection.top if selection.top is not None else selection.bottom
    sign = -1.0 if selection.bottom is not None else 1.0  # rank by sign·score, descending
    k = None if fraction is None else int(math.floor(fraction * len(scores) + 0.5))
    if k is None:
        cut = -np.inf
    else:
        cut = np.sort(sign * scores)[len(scores) - k] if k else np.inf  # the k-th best value
    above, tied = [], []
    for frame in read_frames(out):
        ok = (frame["error"] == "").to_numpy()
        value = sign * frame["score"].to_numpy(dtype=np.float64)
        above.append(frame.loc[ok & (value > cut), ["path", "score"]])
        if k:
            tied.append(frame.loc[ok & (value == cut), ["path", "score"]])
    chosen = pd.concat(above, ignore_index=True) if above else pd.DataFrame(columns=["path", "score"])
    if tied:  # as many of the images scored exactly at the cut as make k, smaller keys first
        ties = pd.concat(tied, ignore_index=True).sort_values("path", kind="stable")
        chosen = pd.concat([chosen, ties.head(k - len(chosen))], ignore_index=True)
    if selection.min_score is not None:
        chosen = chosen[chosen["score"] >= selection.min_score]
    chosen = chosen.assign(order=-sign * chosen["score"]).sort_values(["order", "path"], kind="stable")
    chosen = chosen.drop(columns="order").reset_index(drop=True)
    chosen.insert(0, "rank", np.arange(1, len(chosen) + 1))
    return chosen


def _scores(out: Path, examples: list[str]) -> tuple[np.ndarray, int, Counter]:
    """The scores of the scored rows, the number of rows, and the failure reasons by kind; the first ten
    failures are added to ``examples``."""
    values, total, reasons = [], 0, Counter()
    for frame in read_frames(out):
        total += len(frame)
        ok = frame["error"] == ""
        values.append(frame.loc[ok, "score"].to_numpy(dtype=np.float64))
        for error in frame.loc[~ok, "error"]:
            reasons[_reason_kind(error)] += 1
            if len(examples) < 10:
                examples.append(error)
    return (np.concatenate(values) if values else np.empty(0)), total, reasons


def _reason_kind(error: str) -> str:
    """A failure's reason without the file it names: ``a.jpg: file not found`` → ``file not found``."""
    for kind in ("duplicate key", "file not found", "not a recognised image", "corrupt or truncated",
                 "holds no image", "empty shard", "broken tar shard", "neither a folder nor an image"):  # fmt: skip
        if kind in error:
            return kind
    return error.rsplit(": ", 1)[-1][:80]


def _copy(selected: pd.DataFrame, collection: Collection | None, selection: Selection) -> Path:
    """Copy (or link) the selected images into ``selection.copy_to`` as ``RANK-NAME``; tar samples are
    extracted from their shards (which needs the ``collection``)."""
    folder = Path(selection.copy_to)
    folder.mkdir(parents=True, exist_ok=True)
    width = len(str(max(len(selected), 1)))
    wanted = dict(zip(selected["path"], selected["rank"], strict=True))
    tar_rows = {path for path in wanted if not Path(path).is_file()}
    for path, rank in wanted.items():
        if path in tar_rows:
            continue
        target = folder / f"{rank:0{width}d}-{Path(path).name}"
        target.unlink(missing_ok=True)
        if selection.link:
            target.symlink_to(Path(path).resolve())
        else:
            shutil.copyfile(path, target)
    if tar_rows:
        if collection is None or selection.link:
            how = "linked" if selection.link else "copied without the shards they came from"
            raise ConfigError(f"{len(tar_rows)} selected images are tar samples and cannot be {how}")
        for item in collection:
            if item.key in tar_rows and isinstance(item.data, bytes):
                kind = (Image.open(io.BytesIO(item.data)).format or "img").lower().replace("jpeg", "jpg")
                name = item.key.replace("/", "_")
                atomic_write(
                    folder / f"{wanted[item.key]:0{width}d}-{name}.{kind}",
                    lambda fh, d=item.data: fh.write(d),
                )
                tar_rows.discard(item.key)
    return folder


def _plot(scores: np.ndarray, edges: np.ndarray, cuts: dict[str, float], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.hist(scores, bins=edges, color="#4C72B0")
    colours = {"p1": "#C44E52", "p5": "#DD8452", "p95": "#DD8452", "p99": "#C44E52", "selection": "#55A868"}
    for name, value in cuts.items():
        ax.axvline(value, color=colours.get(name, "k"), ls="--", lw=1.2, label=f"{name} {value:.3f}")
    ax.set_xlabel("score")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    atomic_write(png, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)


def finish(
    out: str | Path,
    *,
    score_range: Sequence[float] | None = None,
    selection: Selection = Selection(),
    collection: Collection | None = None,
    bins: int = 90,
) -> dict:
    """Summarise a finished scores file and apply ``selection``; writes ``stem.summary.json``, ``stem.png`` and,
    when something is selected, ``stem.selected.csv`` (and the copies). Returns the summary.

    ``score_range`` spans the histogram (the model's scale; else the scores' own range)."""
    out = Path(out)
    examples: list[str] = []
    scores, total, reasons = _scores(out, examples)
    lo, hi = (
        (float(v) for v in score_range)
        if score_range
        else ((float(scores.min()), float(scores.max())) if len(scores) else (0.0, 1.0))
    )
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    counts, _ = np.histogram(np.clip(scores, edges[0], edges[-1]), bins=edges)
    percentiles = {f"p{p}": float(np.percentile(scores, p)) for p in PERCENTILES} if len(scores) else {}
    summary: dict = {
        "output": str(out),
        "images": total,
        "scored": len(scores),
        "failed": total - len(scores),
        "failures": dict(reasons.most_common()),
        "failure_examples": examples,
        "score_range": [lo, hi] if score_range else None,
        "mean": float(scores.mean()) if len(scores) else None,
        "percentiles": percentiles,
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }
    cuts = {k: v for k, v in percentiles.items() if k in ("p1", "p5", "p95", "p99")}
    if selection.active:
        chosen = _select(out, scores, selection)
        listed = out.with_name(f"{out.stem}.selected.csv")
        atomic_write_text(listed, chosen.to_csv(index=False))
        fraction = selection.top if selection.top is not None else selection.bottom
        summary["selection"] = {
            **{k: v for k, v in asdict(selection).items() if v not in (None, False)},
            "k": int(math.floor(fraction * len(scores) + 0.5)) if fraction is not None else None,
            "selected": len(chosen),
            "cut": float(chosen["score"].iloc[-1]) if len(chosen) else None,
            "list": str(listed),
        }
        if len(chosen):
            cuts["selection"] = float(chosen["score"].iloc[-1])
        if selection.copy_to and len(chosen):
            summary["selection"]["folder"] = str(_copy(chosen, collection, selection))
    png = out.with_name(f"{out.stem}.png")
    if len(scores):
        _plot(scores, edges, cuts, png, f"{len(scores)} images scored ({total - len(scores)} failed)")
        summary["histogram_png"] = str(png)
    atomic_write_text(out.with_name(f"{out.stem}.summary.json"), json.dumps(summary, indent=1))
    return summary
