"""APDS pseudo-labelling (ELTA, ICML 2024): score an unlabeled pool with a teacher, sharpen, select, write a CSV.

A teacher with a distribution head scores each unlabeled image: distribution p (K bins) and MOS ŝ. APDS sharpens
``q = softmax(z · exp(β · |c − ŝ|))`` with z = log p and c the mean ŝ over the scored set, and keeps the images
with ``max_k q_k > t``. Their pseudo-label is the teacher's unsharpened p and ŝ.

β and t are chosen on labelled data, never on the pool: on the calibration split (by default the ``val`` split of
the teacher's own training dataset) every (β, t) of a grid selects images, and the cell whose selected
predictions have the lowest MAE against the ground truth wins, among selections of at least ``min_selected``
images (ties: the larger selection, then the first cell in grid order).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from elta.config import RunConfig
from elta.data.annotations import Annotations
from elta.data.images import list_images
from elta.engine.evaluate import check_readable
from elta.engine.predictor import Predictions, Predictor
from elta.engine.prepare import hold_out_validation, read_dataset
from elta.engine.runtime import Runtime
from elta.errors import AnnotationError, APDSUnavailableError, CalibrationError, ConfigError, ImageLoadError
from elta.functional import apds_sharpen
from elta.models.checkpoint import Checkpoint, load_checkpoint
from elta.utils import atomic_write_text

__all__ = [
    "APDSUnavailableError",
    "CalibrationError",
    "DEFAULT_BETAS",
    "DEFAULT_THRESHOLDS",
    "UNLABELED_COLUMNS",
    "calibrate_apds",
    "file_fingerprint",
    "format_grid",
    "logits_from_distribution",
    "pseudo_label",
    "read_unlabeled",
    "scalar_head_message",
]

log = logging.getLogger(__name__)

DEFAULT_BETAS = (1.0, 1.1, 1.2, 1.25)  # the original's grid
DEFAULT_THRESHOLDS = (0.70, 0.75, 0.80, 0.85, 0.90)
# Columns that name the image in an unlabeled CSV, tried in this order (case-insensitive).
UNLABELED_COLUMNS = ("path", "image_path", "image", "image_id", "image_name", "filename", "file", "name")


def scalar_head_message(what: str) -> str:
    return (
        f"{what} has a scalar head (one score per image, no distribution over rating bins). APDS sharpens "
        "the predicted distribution over bins, so it needs a distribution head: train the teacher with "
        "--loss emd (the default) on a dataset with vote distributions (AVA, ELTA CSV, KonIQ-10k, PARA)"
    )


def logits_from_distribution(dist: np.ndarray | torch.Tensor) -> torch.Tensor:
    """log p as a logits vector [N, K] (float64): softmax(a·(z + const)) = softmax(a·z) for a per-row a."""
    return torch.as_tensor(dist, dtype=torch.float64).clamp_min(1e-30).log()


def format_grid(grid: Sequence[dict]) -> str:
    """The grid as a table: one row per β, one column per t, each cell 'count / MAE'."""
    betas = list(dict.fromkeys(c["beta"] for c in grid))
    thresholds = list(dict.fromkeys(c["threshold"] for c in grid))
    cells = {}
    for c in grid:
        mae = "-" if c["mae"] is None else f"{c['mae']:.4f}"
        cells[(c["beta"], c["threshold"])] = f"{c['count']:>7d} / {mae:>6}"
    lines = ["β \\ t  " + "".join(f"{t:>16g}" for t in thresholds)]
    lines += [f"{beta:<7g}" + "".join(f"{cells[(beta, t)]:>16}" for t in thresholds) for beta in betas]
    return "\n".join(lines)


def calibrate_apds(
    logits: torch.Tensor | np.ndarray,
    pred_mos: torch.Tensor | np.ndarray,
    gt_mos: torch.Tensor | np.ndarray,
    betas: Sequence[float],
    thresholds: Sequence[float],
    min_selected: int,
    center: float | None = None,
    score_range: Sequence[float] | None = None,
) -> tuple[float, float, list[dict]]:
    """Grid-search β and t on labelled images; returns (beta, threshold, grid).

    logits [N, K], pred_mos / gt_mos [N] on the dataset's scale; center c of APDS (default: mean of pred_mos);
    score_range: that scale's (lo, hi), so that β acts on AVA-equivalent distances (``None``: as given).
    grid: one dict per (β, t) in grid order with ``count`` (selected images) and ``mae`` of the selected
    predictions (None when nothing is selected). The winner has the lowest MAE among cells with
    count ≥ min_selected; ties go to the larger selection, then to the earlier cell.
    Raises CalibrationError (with the grid in its message) when no cell qualifies.
    """
    z = torch.as_tensor(logits, dtype=torch.float64)
    pred = torch.as_tensor(pred_mos, dtype=torch.float64)
    err = (pred - torch.as_tensor(gt_mos, dtype=torch.float64)).abs()
    if not (len(z) == len(pred) == len(err)):
        raise ValueError(f"calibrate_apds: {len(z)} logits rows, {len(pred)} predictions, {len(err)} labels")
    grid = []
    for beta in betas:
        confidence = apds_sharpen(z, pred, float(beta), center, score_range).amax(dim=1)
        for t in thresholds:
            chosen = confidence > t
            count = int(chosen.sum())
            mae = float(err[chosen].mean()) if count else None
            grid.append({"beta": float(beta), "threshold": float(t), "count": count, "mae": mae})
    qualified = [c for c in grid if c["count"] >= min_selected]
    if not qualified:
        raise CalibrationError(
            f"no (β, t) selects at least {min_selected} of the {len(err)} calibration images "
            f"(count / MAE per cell):\n{format_grid(grid)}\n"
            "lower --min-selected, add lower --thresholds or larger --betas, or give --beta and --threshold"
        )
    best = min(qualified, key=lambda c: (c["mae"], -c["count"]))  # min() keeps the earliest on full ties
    return best["beta"], best["threshold"], grid


def _images_in_csv(path: Path) -> list[Path]:
    """Image paths from a CSV column (see UNLABELED_COLUMNS); relative entries are relative to the CSV."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    by_lower = {c.lower(): c for c in frame.columns}
    column = next((by_lower[n] for n in UNLABELED_COLUMNS if n in by_lower), None)
    if column is None:
        raise AnnotationError(
            f"{path}: no image column; name one of {', '.join(UNLABELED_COLUMNS)} "
            f"(header is {list(frame.columns)})"
        )
    paths = []
    for line, entry in enumerate(frame[column].str.strip(), start=2):
        if not entry:
            raise AnnotationError(f"{path} line {line}: empty '{column}'; every row needs an image path")
        image = Path(entry)
        paths.append(image if image.is_absolute() else path.parent / image)
    return paths


def read_unlabeled(paths: Sequence[str | Path]) -> list[Path]:
    """Absolute image paths from files, folders (recursive), .txt/.lst lists and CSVs, in order, deduplicated.

    A CSV (``.csv``) names its images in the first column of :data:`UNLABELED_COLUMNS` it has. Files listed
    in a CSV that are missing are kept here and reported as unreadable when scored.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: dict[Path, None] = {}
    for item in paths:
        item = Path(item)
        if item.suffix.lower() == ".csv":
            if not item.is_file():
                raise FileNotFoundError(f"{item}: unlabeled CSV not found")
            expanded = _images_in_csv(item)
        else:
            expanded = list_images([item])
        found.update(dict.fromkeys(Path(os.path.abspath(p)) for p in expanded))
    return list(found)


def file_fingerprint(path: str | Path) -> str:
    """A short content hash of a file (identifies the checkpoint a pseudo-label file came from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _calibration_rows(cfg: RunConfig, df: pd.DataFrame, split: str) -> pd.DataFrame:
    """The labelled rows to calibrate on; ``val`` of a dataset without one is held out as the trainer does."""
    rows = df[df["split"] == split] if split != "all" else df
    if rows.empty and split == "val":
        _, rows = hold_out_validation(df[df["split"] == "train"], cfg)
    if rows.empty:
        counts = df["split"].replace("", "(none)").value_counts().to_dict()
        raise ConfigError(f"{cfg.data.data}: no rows in split '{split}' to calibrate on (splits: {counts})")
    return rows.reset_index(drop=True)


def _search(
    predictor: Predictor, rows: pd.DataFrame, betas: Sequence, thresholds: Sequence, min_selected: int | None
) -> dict:
    """Score the labelled calibration ``rows`` and run :func:`calibrate_apds` on them."""
    cal = predictor.predict_frame(rows, desc="calibrating")
    check_readable(cal, f"the {len(rows)} calibration images ({rows['path'].iloc[0]} …)")
    ok, gt = cal.ok, rows["mos"].to_numpy(dtype=np.float64)
    n, center = int(ok.sum()), float(cal.score[ok].mean())
    if min_selected is None:  # the smallest selection that counts: 5 % of the images, at least 10
        min_selected = max(10, math.ceil(0.05 * n))
    z, scale = logits_from_distribution(cal.dist[ok]), predictor.spec.score_range
    beta, threshold, grid = calibrate_apds(
        z, cal.score[ok], gt[ok], betas, thresholds, min_selected, center=center, score_range=scale
    )
    return dict(beta=beta, threshold=threshold, grid=grid, center=center, n=n, min_selected=min_selected)


def _pseudo_frame(
    paths: list[Path], preds: Predictions, confidence: np.ndarray, weight: float
) -> pd.DataFrame:
    root = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path()
    ids = [p.relative_to(root).as_posix() for p in paths]
    columns = {"image_id": ids, "path": [str(p) for p in paths], "mos": preds.score}
    columns |= {f"p{k + 1}": preds.dist[:, k] for k in range(preds.dist.shape[1])}
    return pd.DataFrame(columns | {"confidence": confidence, "weight": float(weight), "source": "pseudo"})


def _write_unreadable(path: Path, paths: list[Path], preds: Predictions) -> Path | None:
    bad = [(str(p), e) for p, e in zip(paths, preds.errors, strict=True) if e]
    if not bad:
        path.unlink(missing_ok=True)
        return None
    log.warning("%d unlabeled images could not be read (listed in %s)", len(bad), path)
    return atomic_write_text(path, pd.DataFrame(bad, columns=["path", "reason"]).to_csv(index=False))


def _read_labelled(cfg: RunConfig | None, required: bool) -> Annotations | None:
    """The labelled dataset; with β and t given, the teacher's own dataset may be gone (then None)."""
    if cfg is None:
        return None
    try:
        return read_dataset(cfg)
    except (ValueError, FileNotFoundError) as exc:
        if required:
            raise
        log.warning(
            "cannot read %s (%s): its labelled images are not left out of the pool", cfg.data.data, exc
        )
        return None


def pseudo_label(
    checkpoint: Checkpoint | str | Path,
    unlabeled: Sequence[str | Path],
    out: str | Path,
    runtime: Runtime | None = None,
    *,
    calibration: RunConfig | None = None,
    calibrate_split: str = "val",
    beta: float | None = None,
    threshold: float | None = None,
    betas: Sequence[float] = DEFAULT_BETAS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    min_selected: int | None = None,
    weight: float = 1.0,
) -> dict:
    """Pseudo-label ``unlabeled`` images with the teacher ``checkpoint`` by APDS; write ``out`` (CSV).

    calibration: the labelled dataset whose ``calibrate_split`` chooses (β, t) (default: the teacher's training
    dataset, from its checkpoint). ``beta`` and ``threshold`` given together skip the search. min_selected:
    smallest calibration selection (default 5 % of the calibration images, at least 10). Images labelled in
    the calibration dataset (any split) are left out of the pool. Writes ``out`` (image_id, path, mos,
    p1..pK, confidence, weight, source), ``<stem>.json`` (returned) and, when some images cannot be read,
    ``<stem>_unreadable.csv``.
    """
    if (beta is None) != (threshold is None):
        raise ConfigError("give --beta and --threshold together (or neither, to search the grid)")
    out = Path(out).absolute()
    teacher = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if teacher.spec.head != "distribution":
        raise APDSUnavailableError(scalar_head_message(f"teacher {teacher.path}"))
    pool = read_unlabeled(unlabeled)
    cfg = calibration  # the labelled dataset: given, else the one the teacher was trained on
    if cfg is None and teacher.config:
        cfg = RunConfig.from_dict(teacher.config, source=f"{teacher.path} (config)")
    if cfg is None and beta is None:
        raise ConfigError(
            f"{teacher.path} records no training dataset to calibrate on: "
            "pass --calibrate-data, or --beta and --threshold"
        )
    labelled = _read_labelled(cfg, required=beta is None or calibration is not None)
    # APDS works on the teacher's own distribution and score: no calibration map
    predictor = Predictor.from_checkpoint(teacher, runtime, calibrated=False)

    search = {"grid": None, "center": None, "n": 0, "min_selected": None}
    how = "given"
    if labelled is not None:
        predictor.check_scale(labelled.info.score_range, str(cfg.data.data))
    if beta is None:
        rows = _calibration_rows(cfg, labelled.frame, calibrate_split)
        search = _search(predictor, rows, betas, thresholds, min_selected)
        beta, threshold = search["beta"], search["threshold"]
        how = f"grid on {cfg.data.data} split {calibrate_split}"
        log.info("APDS β=%g, t=%g chosen on %d calibration images (%s)", beta, threshold, search["n"], how)

    known = set(labelled.frame["path"].map(os.path.abspath)) if labelled is not None else set()
    candidates = [p for p in pool if str(p) not in known]
    if len(candidates) < len(pool):
        log.info("leaving out %d images that are labelled in %s", len(pool) - len(candidates), cfg.data.data)
    if not candidates:
        where = f" that are not labelled in {cfg.data.data}" if pool else ""
        raise ImageLoadError(", ".join(map(str, unlabeled)), f"no unlabeled images{where} here")
    preds = predictor.predict_images(candidates, desc="pseudo-labelling")
    ok = preds.ok
    unreadable_path = _write_unreadable(out.with_name(f"{out.stem}_unreadable.csv"), candidates, preds)
    if not ok.any():
        raise ImageLoadError(
            unreadable_path, f"none of the {len(candidates)} unlabeled images could be read (listed here)"
        )
    good = [p for p, keep in zip(candidates, ok, strict=True) if keep]
    good_preds = preds.select(ok)
    center = float(good_preds.score.mean())  # SPEC: c is the mean prediction over the scored set
    z, score = logits_from_distribution(good_preds.dist), torch.as_tensor(good_preds.score)
    q = apds_sharpen(z, score, beta, center, score_range=teacher.spec.score_range)
    confidence = q.amax(dim=1).numpy()
    frame = _pseudo_frame(good, good_preds, confidence, weight)
    selected = frame[confidence > threshold]
    atomic_write_text(out, selected.to_csv(index=False, float_format="%.8g"))
    if selected.empty:
        log.warning("APDS selected none of the %d unlabeled images (β=%g, t=%g)", len(good), beta, threshold)

    counts = {"pool": len(pool), "labelled_skipped": len(pool) - len(candidates), "calibration": search["n"]}
    counts |= {"scored": len(good), "unreadable": len(candidates) - len(good), "selected": len(selected)}
    summary = {
        "teacher_checkpoint": os.path.abspath(teacher.path),
        "teacher_fingerprint": file_fingerprint(teacher.path),
        "beta": float(beta),
        "threshold": float(threshold),
        "chosen_by": how,
        "min_selected": search["min_selected"],
        "grid": search["grid"],
        "apds_center": {"calibration": search["center"], "unlabeled": center},
        "counts": counts,
        "selected_mos_mean": float(selected["mos"].mean()) if len(selected) else None,
        "weight": float(weight),
        "csv": str(out),
        "unreadable_list": str(unreadable_path) if unreadable_path else None,
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=2))
    log.info("pseudo-labelled %d of %d images -> %s", len(selected), len(good), out)
    return summary
