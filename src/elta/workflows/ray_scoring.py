"""Score a collection on a Ray cluster (or a laptop's local Ray) with Ray Data: ``elta predict --engine ray``.

The driver streams the collection into an input table (Parquet files under ``OUT.ray/inputs``: the item's
position, its key, its file, or its bytes for a tar sample, and the reason when it cannot be an image;
duplicate keys are marked here). Ray Data reads that table, ``map_batches`` sends it through a pool of actors
that each hold one :class:`~elta.engine.predictor.Predictor` (built once, by the function the caller gives),
and writes the scored rows as Parquet under ``OUT.ray/scores``. The driver then joins them in input order into
``OUT``, the same rows an in-process run writes. Ray schedules everything; with no address a local Ray is
started for the job (``num_cpus`` CPUs, no dashboard) and shut down after it.

Ray is optional: ``pip install 'elta[ray]'``. The input folder must be readable by every Ray worker (shared
storage on a cluster).
"""

from __future__ import annotations

import heapq
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from elta.data.sources import Collection, key_digest
from elta.engine.predictor import Predictor
from elta.errors import ConfigError, ImageLoadError, UnavailableError
from elta.workflows.collection import DUPLICATE, read_frames, write_frames

__all__ = ["score_with_ray"]

log = logging.getLogger(__name__)

INPUT_ROWS = 8192  # rows of an input-table file


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise UnavailableError("--engine ray needs Ray Data: pip install 'elta[ray]'") from exc
    return ray


class _Scorer:
    """A Ray actor: one Predictor, built once, scoring batches of the input table (pandas frames)."""

    def __init__(self, make_predictor: Callable[[], Predictor]) -> None:
        self.predictor = make_predictor()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        items = []
        for key, file, data, error in zip(
            batch["path"], batch["file"], batch["data"], batch["error"], strict=True
        ):
            if error:
                items.append(ImageLoadError(key, error))
            else:
                items.append(bytes(data) if data is not None and not file else Path(file))
        preds = self.predictor.predict_images(items, desc="ray batch")
        return preds.table(batch["path"].to_numpy(), index=batch["index"].to_numpy(dtype=np.int64))


def _write_inputs(collection: Collection, folder: Path, per_file: int) -> int:
    """The input table, streamed from the collection into Parquet files of ``per_file`` rows (Ray's blocks);
    returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("index", pa.int64()), ("path", pa.string()), ("file", pa.string()), ("data", pa.binary()),
         ("error", pa.string())]
    )  # fmt: skip
    folder.mkdir(parents=True)
    seen: set[int] = set()
    rows: list[dict] = []
    files = 0

    def flush() -> None:
        nonlocal rows, files
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / f"inputs-{files:06d}.parquet")
        rows, files = [], files + 1

    count = 0
    for index, item in enumerate(collection):
        digest = key_digest(item.key)
        error = DUPLICATE if digest in seen else item.error
        seen.add(digest)
        is_bytes = isinstance(item.data, bytes)
        rows.append({
            "index": index, "path": item.key, "file": "" if is_bytes or item.data is None else str(item.data),
            "data": item.data if is_bytes and not error else None, "error": error,
        })  # fmt: skip
        count += 1
        if len(rows) >= per_file:
            flush()
    if rows:
        flush()
    return count


def _sorted_rows(path: Path) -> Iterator[tuple[int, tuple]]:
    for frame in read_frames(path):
        frame = frame.sort_values("index", kind="stable")
        index = frame.pop("index").to_numpy()
        yield from zip(index.tolist(), frame.itertuples(index=False, name=None), strict=True)


def score_with_ray(
    make_predictor: Callable[[], Predictor],
    collection: Collection,
    out: str | Path,
    *,
    address: str | None = None,
    actors: int = 2,
    gpus_per_actor: float = 0.0,
    batch_size: int = 32,
    num_cpus: int | None = None,
    rows: int = 65536,
) -> Path:
    """Score ``collection`` with ``actors`` Ray actors, each holding ``make_predictor()`` (``gpus_per_actor``
    GPUs each), into ``out`` (.parquet, .csv, .jsonl or .json), rows in collection order. ``address`` is an
    existing cluster's (``auto``: the one this machine belongs to); None starts a local Ray with ``num_cpus``."""
    ray = _ray()
    if actors < 1:
        raise ConfigError(f"--actors {actors}: at least one actor scores")
    out = Path(out)
    work = out.with_name(out.name + ".ray")
    if work.exists():
        shutil.rmtree(work)
    # about four blocks an actor, so that every actor has work; at most INPUT_ROWS rows a block
    per_file = min(INPUT_ROWS, max(batch_size, math.ceil(collection.count() / (4 * actors))))
    count = _write_inputs(collection, work / "inputs", per_file)
    if count == 0:
        raise ImageLoadError(", ".join(collection.inputs), "no images here")
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=num_cpus or max(2, actors), include_dashboard=False)
            started = True
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        files = len(list((work / "inputs").glob("*.parquet")))
        dataset = ray.data.read_parquet(str(work / "inputs"), override_num_blocks=files)
        # the actors leave one CPU of the cluster to reading the table and writing the scores
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        cpus_per_actor = max(0.1, min(1.0, (cpus - 1.0) / actors))
        scored = dataset.map_batches(
            _Scorer,
            fn_constructor_args=(make_predictor,),
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=batch_size,
            batch_format="pandas",
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor or None,
        )
        scored.write_parquet(str(work / "scores"))
    finally:
        if started:
            ray.shutdown()
    parts = sorted((work / "scores").glob("*.parquet"))
    header = None
    for path in parts:
        header = next(read_frames(path, rows=1)).columns.drop("index")
        break
    merged = heapq.merge(*(_sorted_rows(p) for p in parts), key=lambda row: row[0])

    def frames() -> Iterator[pd.DataFrame]:
        block: list[tuple] = []
        seen = 0
        for index, row in merged:
            if index != seen:
                raise RuntimeError(f"Ray returned row {index} where row {seen} was expected")
            seen += 1
            block.append(row)
            if len(block) >= rows:
                yield pd.DataFrame(block, columns=header)
                block = []
        if block:
            yield pd.DataFrame(block, columns=header)
        if seen != count:
            raise RuntimeError(f"Ray returned {seen} of the {count} rows")

    write_frames(frames(), out)
    shutil.rmtree(work)
    return out
