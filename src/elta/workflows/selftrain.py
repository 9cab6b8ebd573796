"""Self-training with APDS pseudo-labels: teacher, then rounds of (pseudo-label, student), all resumable.

Layout under ``out``::

    teacher/                     a normal run (train on the labelled data)
    round1/pseudo.csv, .json     APDS pseudo-labels from teacher/best.pt, (β, t) chosen on the labelled val split
    round1/student/              a run on labelled ∪ pseudo-labelled images
    round2/ ...                  pseudo-labels from round1/student/best.pt, and so on
    self_train.json              stage paths and best validation metrics

Every student starts fresh, with the teacher's recipe (same config, same initial weights); only its training
rows differ. Each round's pseudo-labels replace the previous round's. A stage that is complete is skipped, so
rerunning the same command after an interruption continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from elta.config import RunConfig
from elta.engine.prepare import read_dataset
from elta.engine.runtime import Runtime
from elta.engine.trainer import train
from elta.enhancers import scalar_head_users
from elta.errors import ConfigError, StaleStageError
from elta.models.heads import resolve_loss
from elta.utils import atomic_write_text
from elta.workflows.pseudo import (
    DEFAULT_BETAS,
    DEFAULT_THRESHOLDS,
    APDSUnavailableError,
    file_fingerprint,
    pseudo_label,
    read_unlabeled,
    scalar_head_message,
)

__all__ = ["self_train", "format_summary", "StaleStageError"]

log = logging.getLogger(__name__)


def _check_config(cfg: RunConfig) -> None:
    """Refuse before any training: own pseudo-labels given, or runs that would have a scalar head."""
    if cfg.data.pseudo_labels:
        raise ConfigError(
            "self-train makes its own pseudo-labels; drop --pseudo-labels (or use `elta train` with it)"
        )
    info = read_dataset(cfg).info
    users = scalar_head_users(cfg.enhancers)
    try:
        loss = resolve_loss(cfg.train.loss, info.has_distribution, users)
    except ValueError as exc:
        raise APDSUnavailableError(f"{cfg.data.data}: {exc}") from exc
    if loss != "emd":
        why = f"{', '.join(users)} needs a scalar head" if users else "the dataset has only MOS"
        why = f"--loss {cfg.train.loss}" if cfg.train.loss != "auto" else why
        raise APDSUnavailableError(scalar_head_message(f"the teacher ({why})"))


def _stage(name: str, summary: dict) -> dict:
    run_dir = Path(summary["run_dir"])
    kept = {k: summary[k] for k in ("best", "metric", "best_metric", "best_epoch")}
    split = run_dir / "split.csv"
    train_rows = int((pd.read_csv(split)["split"] == "train").sum()) if split.is_file() else None
    return {"name": name, "run_dir": str(run_dir), **kept, "train_rows": train_rows}


def _pseudo_stage(
    teacher_best: Path,
    round_dir: Path,
    request: dict,
    cfg: RunConfig,
    unlabeled: Sequence[str | Path],
    progress: bool,
) -> dict:
    """round_dir/pseudo.csv from ``teacher_best``; reused when already made from this teacher and request."""
    csv, meta = round_dir / "pseudo.csv", round_dir / "pseudo.json"
    if csv.is_file() and meta.is_file():
        done = json.loads(meta.read_text(encoding="utf-8"))
        same_teacher = done.get("teacher_fingerprint") == file_fingerprint(teacher_best)
        if same_teacher and done.get("request") == request:
            log.info("reusing %s (%d pseudo-labels)", csv, done["counts"]["selected"])
            return done
        if (round_dir / "student" / "last.pt").exists():
            raise StaleStageError(
                f"{csv} was made from another teacher checkpoint or other settings than now, and "
                f"{round_dir / 'student'} has already trained on it: delete {round_dir} to redo this round, "
                "or use another --out"
            )
        log.info("%s is out of date (teacher or settings changed): making it again", csv)
    runtime = Runtime.from_config(cfg.runtime, progress=progress)
    apds = {k: request[k] for k in ("beta", "threshold", "betas", "thresholds", "min_selected")}
    labelled = {"calibration": cfg, "calibrate_split": "val", "weight": cfg.data.pseudo_weight}
    summary = pseudo_label(teacher_best, unlabeled, csv, runtime, **labelled, **apds)
    summary["request"] = request
    atomic_write_text(meta, json.dumps(summary, indent=2))
    return summary


def self_train(
    cfg: RunConfig,
    out: str | Path,
    unlabeled: Sequence[str | Path],
    *,
    rounds: int = 1,
    beta: float | None = None,
    threshold: float | None = None,
    betas: Sequence[float] = DEFAULT_BETAS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    min_selected: int | None = None,
    progress: bool = False,
) -> dict:
    """Teacher, then ``rounds`` × (APDS pseudo-labels, fresh student) under ``out``; resumable.

    Pseudo-label rows get the loss weight ``cfg.data.pseudo_weight``. Returns what is written to
    ``out/self_train.json``: the stages (teacher, round1 …) with run folders and best validation metrics.
    """
    if rounds < 1:
        raise ConfigError(f"--rounds must be ≥ 1; got {rounds}")
    if (beta is None) != (threshold is None):
        raise ConfigError("give --beta and --threshold together (or neither, to search the grid)")
    _check_config(cfg)
    out = Path(out).absolute()  # the students' config.yaml names their pseudo-label CSV by this path
    pool = read_unlabeled(unlabeled)  # fails early on a wrong path, before hours of training
    # count and hash of the unlabeled file list: a changed pool makes a round's pseudo-labels out of date
    digest = hashlib.sha256("\n".join(map(str, pool)).encode("utf-8")).hexdigest()[:16]
    request = {"unlabeled": f"{len(pool)} images, {digest}", "beta": beta, "threshold": threshold}
    request |= {"betas": [float(b) for b in betas], "thresholds": [float(t) for t in thresholds]}
    request |= {"min_selected": min_selected, "weight": cfg.data.pseudo_weight}
    log.info("self-training: teacher in %s", out / "teacher")
    teacher = _stage("teacher", train(cfg, out / "teacher", resume=True, progress=progress))
    stages = [teacher]
    previous = Path(teacher["best"])
    for r in range(1, rounds + 1):
        round_dir = out / f"round{r}"
        pseudo = _pseudo_stage(previous, round_dir, request, cfg, unlabeled, progress)
        student_cfg = cfg.override("data", pseudo_labels=str(round_dir / "pseudo.csv"))
        log.info("round %d: student on labelled + %d pseudo-labelled images", r, pseudo["counts"]["selected"])
        run = train(student_cfg, round_dir / "student", resume=True, progress=progress)
        student = _stage(f"round{r}", run)
        student.update(pseudo_csv=str(round_dir / "pseudo.csv"), pseudo_json=str(round_dir / "pseudo.json"))
        student.update(teacher=str(previous), beta=pseudo["beta"], threshold=pseudo["threshold"])
        student["pseudo_rows"] = pseudo["counts"]["selected"]
        stages.append(student)
        previous = Path(student["best"])
    result = {"out": str(out), "rounds": rounds, "metric": cfg.train.metric, "stages": stages}
    atomic_write_text(out / "self_train.json", json.dumps(result, indent=2))
    return result


def format_summary(result: dict) -> str:
    """Teacher vs students: training rows, pseudo-label rows, (β, t), best validation metric and epoch."""
    metric = result["metric"]
    lines = [
        f"{'stage':<10}{'train rows':>12}{'pseudo':>8}{'β':>7}{'t':>7}{'best val ' + metric:>16}{'epoch':>7}"
    ]
    for s in result["stages"]:
        rows = "" if s["train_rows"] is None else str(s["train_rows"])
        beta, t = (f"{s[key]:g}" if key in s else "-" for key in ("beta", "threshold"))
        lines.append(
            f"{s['name']:<10}{rows:>12}{s.get('pseudo_rows', 0):>8}{beta:>7}{t:>7}"
            f"{s['best_metric']:>16.4f}{s['best_epoch']:>7}"
        )
    return "\n".join(lines)
