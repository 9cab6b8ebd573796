"""Reading, checking and splitting a run's dataset, and adding pseudo-labelled rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from elta.config import RunConfig
from elta.data.annotations import Annotations, DatasetInfo, read_annotations
from elta.data.check import check_images, write_problems
from elta.data.dataset import dist_columns
from elta.data.formats import CsvColumns
from elta.errors import AnnotationError, ConfigError
from elta.utils import atomic_write_text, derive_seed

__all__ = ["PreparedData", "read_dataset", "prepare_data", "read_pseudo_labels", "hold_out_validation"]

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: pd.DataFrame  # labelled (and pseudo-labelled) training rows; column `weight` = loss weight
    val: pd.DataFrame
    info: DatasetInfo  # centers, score_range, has_distribution, acc_threshold, format, images_root ...
    problems: list[dict]  # every row that was skipped, as written to bad_rows.csv


def read_dataset(cfg: RunConfig) -> Annotations:
    """``read_annotations`` with the run's data settings."""
    d = cfg.data
    if d.data is None:
        raise ConfigError("no dataset given: pass --data (annotation file or folder)")
    columns = CsvColumns(image=d.image_column, mos=d.mos_column, split=d.split_column, group=d.group_column)
    options = {"splits": d.splits, "strict": d.strict, "columns": columns, "score_range": d.score_range}
    return read_annotations(d.data, d.format, d.images, **options)


def read_pseudo_labels(path: str | Path, num_bins: int, default_weight: float) -> pd.DataFrame:
    """Rows of a pseudo-label CSV (``elta pseudo-label``): image_id, path, mos, p1..pK, optional weight."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pseudo labels {path}: no such file")
    frame = pd.read_csv(path, keep_default_na=False)
    required = {"image_id", "path", "mos"}
    missing = required - set(frame.columns)
    if missing:
        raise AnnotationError(
            f"{path}: missing column(s) {sorted(missing)}; expected {sorted(required)}, p1..pK"
        )
    cols = dist_columns(frame)
    if num_bins and len(cols) != num_bins:
        raise AnnotationError(f"{path}: {len(cols)} distribution columns, the dataset has {num_bins} bins")
    frame["image_id"] = frame["image_id"].astype(str)
    frame["mos"] = frame["mos"].astype(float)
    if "weight" not in frame.columns:
        frame["weight"] = default_weight
    frame["source"] = path.name  # bad-row reports name the pseudo-label file and its line
    frame["row"] = np.arange(2, len(frame) + 2)
    frame["split"] = "train"
    if "group" not in frame.columns:
        frame["group"] = ""
    return frame


def hold_out_validation(train_df: pd.DataFrame, cfg: RunConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``cfg.data.val_fraction`` of the training rows off as validation, by the run's seed."""
    n_val = max(1, int(round(len(train_df) * cfg.data.val_fraction)))
    if n_val >= len(train_df):
        raise AnnotationError(
            f"{cfg.data.data}: too few training rows ({len(train_df)}) to hold out validation"
        )
    rng = np.random.default_rng(derive_seed(cfg.train.seed, 7919))
    mask = np.zeros(len(train_df), dtype=bool)
    mask[rng.permutation(len(train_df))[:n_val]] = True
    what = "no validation split in %s: holding out %.0f%% of train (%d images, seed %d) for validation"
    log.info(what, cfg.data.data, 100 * cfg.data.val_fraction, n_val, cfg.train.seed)
    return train_df[~mask], train_df[mask]


def prepare_data(cfg: RunConfig, run_dir: Path, progress: bool = False, write: bool = True) -> PreparedData:
    """Read, check and split the dataset; every skipped row is written to ``run_dir/bad_rows.csv``.

    With ``write=False`` (the other processes of a distributed run) nothing is written.
    """
    annotations = read_dataset(cfg)
    df, info, problems = annotations.frame, annotations.info, list(annotations.problems)
    image_problems = check_images(df, deep=False, progress=progress)
    problems += image_problems
    if problems:
        where = run_dir / "bad_rows.csv"
        if write:
            write_problems(problems, where)
        if cfg.data.strict:
            first = "; ".join(f"{p['file']} row {p['row']}: {p['reason']}" for p in problems[:5])
            raise AnnotationError(f"{len(problems)} bad rows (strict mode): {first} … full list: {where}")
        log.warning("skipping %d bad rows (listed in %s)", len(problems), where)
    df = df[~df["path"].isin({p.get("path") for p in image_problems})].assign(weight=1.0)
    train_df, val_df = df[df["split"] == "train"], df[df["split"] == "val"]
    if train_df.empty:
        raise AnnotationError(f"{cfg.data.data}: no usable training rows ({info.split_source})")
    if val_df.empty:
        train_df, val_df = hold_out_validation(train_df, cfg)
    if cfg.data.pseudo_labels:
        pseudo = read_pseudo_labels(cfg.data.pseudo_labels, info.num_bins, cfg.data.pseudo_weight)
        overlap = set(pseudo["path"]) & (set(val_df["path"]) | set(train_df["path"]))
        if overlap:
            raise AnnotationError(
                f"{cfg.data.pseudo_labels}: {len(overlap)} pseudo-labelled images are also labelled "
                f"(e.g. {sorted(overlap)[0]}); pseudo-label only unlabelled images"
            )
        train_df = pd.concat([train_df, pseudo.reindex(columns=train_df.columns)])
        log.info("added %d pseudo-labelled rows from %s", len(pseudo), cfg.data.pseudo_labels)
    split_table = pd.concat([train_df.assign(split="train"), val_df.assign(split="val")])
    if write:
        atomic_write_text(run_dir / "split.csv", split_table[["image_id", "split"]].to_csv(index=False))
    return PreparedData(train_df.reset_index(drop=True), val_df.reset_index(drop=True), info, problems)
