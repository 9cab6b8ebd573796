"""Dataset checking: annotation problems, missing or unreadable images, MOS statistics (`elta data check`)."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from elta.data.annotations import Annotations
from elta.data.images import load_image, read_image_size
from elta.errors import ImageLoadError
from elta.progress import progress_bar
from elta.utils import atomic_write_text

__all__ = ["CheckReport", "check_dataset", "check_images", "write_problems"]

logger = logging.getLogger(__name__)

PROBLEM_COLUMNS = ("file", "row", "reason", "image_id", "path")
_SHOWN_PROBLEMS = 50


@dataclass
class CheckReport:
    """Outcome of a dataset check.

    `n_rows` counts the annotation rows read (skipped ones included), `n_ok` the rows kept whose image is
    usable; `problems` are dicts with file, row, reason (and image_id, path for image problems); `stats` holds
    count, mean, sd, min, max of the MOS of the ok rows and `splits`, their count per split.
    """

    n_rows: int
    n_ok: int
    problems: list[dict]
    stats: dict
    mos: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def format(self, histogram_bins: int = 20, width: int = 50) -> str:
        """A human report: counts, MOS statistics, a text histogram of MOS, then the first 50 problems."""
        s = self.stats
        lines = [f"rows: {self.n_rows} read, {self.n_ok} ok, {len(self.problems)} problem(s)"]
        if s["count"]:
            values = "  ".join(f"{key} {s[key]:.4g}" for key in ("mean", "sd", "min", "max"))
            lines.append(f"MOS: count {s['count']}  {values}")
        splits = ", ".join(f"{name or '(none)'} {n}" for name, n in s["splits"].items())
        lines.append(f"splits: {splits or '-'}")
        if len(self.mos):
            lines.append(f"MOS histogram ({histogram_bins} bins):")
            lines.extend(_histogram(self.mos, histogram_bins, width))
        if self.problems:
            lines.append(f"problems ({len(self.problems)}):")
            lines += [f"  {p['file']}:{p['row']}: {p['reason']}" for p in self.problems[:_SHOWN_PROBLEMS]]
            if len(self.problems) > _SHOWN_PROBLEMS:
                lines.append(f"  … {len(self.problems) - _SHOWN_PROBLEMS} more")
        return "\n".join(lines)


def _histogram(values: np.ndarray, bins: int, width: int) -> list[str]:
    """Text histogram lines `lo – hi | ### | count`, bars scaled to the fullest bin."""
    counts, edges = np.histogram(values, bins=bins)
    top = max(int(counts.max()), 1)
    digits = len(str(top))
    return [
        f"  {edges[k]:8.3f} – {edges[k + 1]:8.3f} |{'#' * round(width * c / top):<{width}}| {c:>{digits}}"
        for k, c in enumerate(counts)
    ]


def _image_problem(row: tuple, reason: str) -> dict:
    source, line, image_id, path = row
    return dict(zip(PROBLEM_COLUMNS, (str(source), int(line), reason, str(image_id), str(path)), strict=True))


def check_images(df: pd.DataFrame, deep: bool = True, progress: bool = False) -> list[dict]:
    """Problems with the images of an annotation table: missing files and, with `deep`, files that do not
    decode (without `deep`, only the header is read: fast, but misses truncated data)."""
    problems = []
    read = load_image if deep else read_image_size
    rows = df[["source", "row", "image_id", "path"]].itertuples(index=False, name=None)
    for row in progress_bar(rows, desc="checking images", total=len(df), unit="img", enabled=progress):
        path = Path(row[3])
        if not path.is_file():
            problems.append(_image_problem(row, f"image not found: {path}"))
            continue
        try:
            read(path)
        except ImageLoadError as err:
            problems.append(_image_problem(row, f"unreadable image: {err.reason}"))
    return problems


def _split_counts(split: pd.Series) -> dict[str, int]:
    """Rows per split, in the order train, val, test, then the rest ("" = in no split list)."""
    counts = split.value_counts().to_dict()
    order = ["train", "val", "test", *sorted(set(counts) - {"train", "val", "test"})]
    return {name: int(counts[name]) for name in order if name in counts}


def check_dataset(annotations: Annotations, deep: bool = True, progress: bool = False) -> CheckReport:
    """Annotation problems plus image problems, and MOS statistics of the ok rows."""
    df = annotations.frame
    image_problems = check_images(df, deep=deep, progress=progress)
    bad = {(p["file"], p["row"]) for p in image_problems}
    ok = df[[(s, r) not in bad for s, r in zip(df["source"], df["row"], strict=True)]]
    mos = ok["mos"].to_numpy(dtype=np.float64)
    summary = pd.Series(mos).agg(["mean", "std", "min", "max"]).rename({"std": "sd"})  # NaN when undefined
    stats = {"count": int(mos.size), **{key: float(value) for key, value in summary.items()}}
    stats["splits"] = _split_counts(ok["split"])
    if image_problems:
        logger.warning("%d image problem(s), first: %s", len(image_problems), image_problems[0]["reason"])
    return CheckReport(annotations.info.rows_read, len(ok), annotations.problems + image_problems, stats, mos)


def write_problems(problems: list[dict], path: str | Path) -> Path:
    """Write problems as CSV (file,row,reason,image_id,path; "" where a problem has none), atomically."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=PROBLEM_COLUMNS, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(problems)
    return atomic_write_text(path, text.getvalue())
