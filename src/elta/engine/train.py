"""The training loop: data preparation, epochs, validation, checkpoints, exact resume.

Randomness is a function of (seed, epoch, step): the shuffle of epoch e, the augmentation of each sample
and the dropout masks of each step are derived from the run seed. A run killed at any point and resumed
from ``last.pt`` therefore ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from elta.config import RunConfig
from elta.data.check import check_images, write_problems
from elta.data.dataset import AnnotationDataset, Batch, dist_columns
from elta.data.readers import AnnotationError, CsvColumns, read_annotations
from elta.data.transforms import ImageTransform
from elta.engine.checkpoint import load_checkpoint, save_checkpoint
from elta.engine.inference import Predictions, default_workers, make_loader, run_inference
from elta.functional import emd_loss
from elta.metrics import emd as emd_metric
from elta.metrics import evaluate
from elta.models.model import AestheticModel, build_model
from elta.utils import atomic_write_text, derive_seed, resolve_device

__all__ = ["train", "prepare_data", "TrainingDivergedError", "RunExistsError", "read_dataset"]

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunExistsError(RuntimeError):
    """The output folder already holds a run and --resume was not given."""


@dataclass
class PreparedData:
    train: pd.DataFrame
    val: pd.DataFrame
    attrs: dict
    problems: list[dict]


def read_dataset(cfg: RunConfig) -> pd.DataFrame:
    """``read_annotations`` with the run's data settings."""
    d = cfg.data
    if d.data is None:
        raise ValueError("no dataset given: pass --data (annotation file or folder)")
    columns = CsvColumns(image=d.image_column, mos=d.mos_column, split=d.split_column, group=d.group_column)
    return read_annotations(
        d.data,
        d.format,
        d.images,
        splits=d.splits,
        strict=d.strict,
        columns=columns,
        score_range=d.score_range,
    )


def prepare_data(cfg: RunConfig, run_dir: Path, progress: bool = False) -> PreparedData:
    """Read, check and split the dataset; every skipped row is written to ``run_dir/bad_rows.csv``."""
    df = read_dataset(cfg)
    problems = list(df.attrs.get("problems", []))
    image_problems = check_images(df, deep=False, progress=progress)
    problems += image_problems
    if problems:
        where = write_problems(problems, run_dir / "bad_rows.csv")
        if cfg.data.strict:
            first = "; ".join(f"{p['file']} row {p['row']}: {p['reason']}" for p in problems[:5])
            raise AnnotationError(f"{len(problems)} bad rows (strict mode): {first} … full list: {where}")
        log.warning("skipping %d bad rows (listed in %s)", len(problems), where)
    bad_paths = {p.get("path") for p in image_problems}
    df = df[~df["path"].isin(bad_paths)]
    train_df = df[df["split"] == "train"]
    val_df = df[df["split"] == "val"]
    if train_df.empty:
        raise AnnotationError(
            f"{cfg.data.data}: no usable training rows ({df.attrs.get('split_source', '')})"
        )
    if val_df.empty:
        n_val = max(1, int(round(len(train_df) * cfg.data.val_fraction)))
        if n_val >= len(train_df):
            raise AnnotationError(
                f"{cfg.data.data}: too few training rows ({len(train_df)}) to hold out validation"
            )
        rng = np.random.default_rng(derive_seed(cfg.train.seed, 7919))
        held = rng.permutation(len(train_df))[:n_val]
        mask = np.zeros(len(train_df), dtype=bool)
        mask[held] = True
        val_df, train_df = train_df[mask], train_df[~mask]
        log.info(
            "no validation split in %s: holding out %.0f%% of train (%d images, seed %d) for validation",
            cfg.data.data,
            100 * cfg.data.val_fraction,
            n_val,
            cfg.train.seed,
        )
    split_table = pd.concat([train_df.assign(split="train"), val_df.assign(split="val")])[
        ["image_id", "split"]
    ]
    atomic_write_text(run_dir / "split.csv", split_table.to_csv(index=False))
    return PreparedData(
        train_df.reset_index(drop=True), val_df.reset_index(drop=True), dict(df.attrs), problems
    )


def resolve_loss(name: str, has_distribution: bool) -> str:
    if name == "auto":
        return "emd" if has_distribution else "mse"
    if name == "emd" and not has_distribution:
        raise ValueError(
            "--loss emd needs vote distributions, and this dataset has only MOS: use --loss mse or l1"
        )
    return name


def main_loss(model: AestheticModel, out, batch: Batch, loss_name: str) -> torch.Tensor:
    """EMD on distributions, or MSE / L1 on the MOS scaled to [0, 1]."""
    if loss_name == "emd":
        return emd_loss(out.distribution, batch.dist)
    lo, hi = model.score_range[0], model.score_range[1]
    target = (batch.mos - lo) / (hi - lo)
    if loss_name == "mse":
        return F.mse_loss(out.score_unit, target)
    return F.l1_loss(out.score_unit, target)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch; a last batch of one sample joins the one before it."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 0))
    order = torch.randperm(n, generator=generator).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2].extend(batches.pop())
    return batches


def make_optimizer(model: AestheticModel, cfg: RunConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, steps_per_epoch: int):
    """Per-step schedule: linear warm-up, then constant or cosine to zero."""
    total = max(1, cfg.train.epochs * steps_per_epoch)
    warmup = int(round(cfg.train.warmup_epochs * steps_per_epoch))
    cosine = cfg.train.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def validation_row(model: AestheticModel, preds: Predictions, frame: pd.DataFrame, loss_name: str) -> dict:
    """Validation loss and metrics on the rows whose images loaded."""
    ok = preds.ok
    spec = model.spec
    gt = frame["mos"].to_numpy(dtype=np.float64)[ok]
    pred = preds.score[ok]
    cols = dist_columns(frame)
    gt_dist = frame[cols].to_numpy(dtype=np.float64)[ok] if cols else None
    pred_dist = preds.dist[ok] if preds.dist is not None else None
    metrics = evaluate(
        pred,
        gt,
        pred_dist=pred_dist,
        gt_dist=gt_dist if pred_dist is not None else None,
        threshold=spec.acc_threshold,
        score_range=tuple(spec.score_range),
    )
    if loss_name == "emd":
        val_loss = emd_metric(pred_dist, gt_dist)
    else:
        lo, hi = spec.score_range
        diff = (pred - gt) / (hi - lo)
        val_loss = float(np.mean(diff**2) if loss_name == "mse" else np.mean(np.abs(diff)))
    row = {"val_loss": float(val_loss)}
    row.update({f"val_{k}": v for k, v in metrics.items() if k != "n"})
    return row


class _RunLog:
    """metrics.csv (one row an epoch, rewritten atomically) and bad_rows.csv for one run directory."""

    def __init__(self, run_dir: Path, problems: list[dict]) -> None:
        self.metrics_path = run_dir / "metrics.csv"
        self.bad_rows_path = run_dir / "bad_rows.csv"
        self.rows: list[dict] = []
        self.problems = list(problems)

    def restore(self, completed_epochs: int) -> None:
        if self.metrics_path.is_file():
            old = pd.read_csv(self.metrics_path)
            self.rows = old[old["epoch"] <= completed_epochs].to_dict("records")

    def add_epoch(self, row: dict) -> None:
        self.rows.append(row)
        atomic_write_text(self.metrics_path, pd.DataFrame(self.rows).to_csv(index=False))

    def add_failures(self, frame: pd.DataFrame, failures: list[tuple[int, str]]) -> None:
        for index, reason in failures:
            record = frame.iloc[index]
            self.problems.append(
                {
                    "file": record.get("source", ""),
                    "row": int(record.get("row", -1)),
                    "reason": reason,
                    "image_id": record["image_id"],
                    "path": record["path"],
                }
            )
        write_problems(self.problems, self.bad_rows_path)


def _attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("elta")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = False) -> dict:
    """Train per ``cfg`` into ``run_dir``; with ``resume`` continue from ``run_dir/last.pt``.

    Returns a summary: best metric and epoch, paths of best.pt / last.pt / metrics.csv.
    """
    run_dir = Path(run_dir)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if last_path.exists() and not resume:
        raise RunExistsError(
            f"{run_dir} already holds a run (last.pt): use --resume {run_dir} or another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _attach_log_file(run_dir)
    try:
        return _train(cfg, run_dir, last_path, best_path, resume and last_path.exists(), progress)
    finally:
        logging.getLogger("elta").removeHandler(handler)
        handler.close()


def _train(
    cfg: RunConfig, run_dir: Path, last_path: Path, best_path: Path, resume: bool, progress: bool
) -> dict:
    t = cfg.train
    device = resolve_device(t.device)
    cfg.to_yaml(run_dir / "config.yaml")
    data = prepare_data(cfg, run_dir, progress=progress)
    loss_name = resolve_loss(t.loss, data.attrs["has_distribution"])
    head = "distribution" if loss_name == "emd" else "scalar"
    groups = data.train["group"].astype(str)
    group_counts = {g: int(c) for g, c in groups[groups != ""].value_counts().items()}
    state = load_checkpoint(last_path) if resume else None
    torch.manual_seed(derive_seed(t.seed, -1))  # the initial weights of new layers
    model = build_model(
        cfg.model.backbone,
        head,
        data.attrs["centers"],
        data.attrs["score_range"],
        weights="none" if resume else cfg.model.weights,
        image_size=cfg.model.image_size,
        resize=cfg.model.resize,
        neck_dim=cfg.model.neck_dim,
        dropout=cfg.model.dropout,
        acc_threshold=data.attrs.get("acc_threshold"),
        dataset_format=data.attrs.get("format", ""),
        group_counts=group_counts,
    ).to(device)
    workers = default_workers(device) if cfg.data.workers is None else cfg.data.workers
    train_set = AnnotationDataset(data.train, ImageTransform.from_spec(model.spec, train=True), seed=t.seed)
    val_set = AnnotationDataset(data.val, ImageTransform.from_spec(model.spec, train=False))
    steps_per_epoch = len(epoch_batches(len(train_set), t.batch_size, t.seed, 0))
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    runlog = _RunLog(run_dir, data.problems)
    start_epoch, start_step, global_step = 0, 0, 0
    best_metric, best_epoch = -math.inf, 0
    carried = {"loss_sum": 0.0, "samples": 0}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
        best_metric, best_epoch = state["best_metric"], state["best_epoch"]
        carried = {"loss_sum": state["epoch_loss_sum"], "samples": state["epoch_samples"]}
        runlog.restore(start_epoch)
        log.info("resuming %s at epoch %d, step %d", run_dir, start_epoch + 1, start_step)
    log.info(
        "training %s (%s head, %s loss) on %d images, validating on %d; %d steps an epoch on %s",
        cfg.model.backbone,
        head,
        loss_name,
        len(train_set),
        len(val_set),
        steps_per_epoch,
        device,
    )

    def snapshot(epoch_done: int, step: int, loss_sum: float, samples: int) -> dict:
        return {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch_done,
            "step": step,
            "global_step": global_step,
            "best_metric": best_metric,
            "best_epoch": best_epoch,
            "epoch_loss_sum": loss_sum,
            "epoch_samples": samples,
            "config": cfg.to_dict(),
        }

    epoch_bar = tqdm(range(start_epoch, t.epochs), desc="epochs", unit="epoch", disable=not progress)
    for epoch in epoch_bar:
        started = time.perf_counter()
        model.train()
        train_set.set_epoch(epoch)
        batches = epoch_batches(len(train_set), t.batch_size, t.seed, epoch)
        first = start_step if epoch == start_epoch else 0
        loss_sum, samples = (carried["loss_sum"], carried["samples"]) if first else (0.0, 0)
        loader = make_loader(train_set, t.batch_size, workers, device, batch_sampler=batches[first:])
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}",
            unit="batch",
            disable=not progress,
            leave=False,
            initial=first,
            total=len(batches),
        )
        for step, batch in enumerate(bar, start=first):
            if batch.failures:
                runlog.add_failures(data.train, batch.failures)
                log.warning(
                    "skipped %d unreadable training images (listed in %s)",
                    len(batch.failures),
                    runlog.bad_rows_path,
                )
                if cfg.data.strict:
                    raise AnnotationError(f"unreadable training image (strict mode): {batch.failures[0][1]}")
            if len(batch) < 2:
                continue
            torch.manual_seed(derive_seed(t.seed, epoch, step, 1))
            batch.images = batch.images.to(device, non_blocking=True)
            batch.mos = batch.mos.to(device)
            batch.dist = batch.dist.to(device) if batch.dist is not None else None
            out = model(batch.images)
            loss = main_loss(model, out, batch, loss_name)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                kept = (
                    f"the last good checkpoint is {last_path}"
                    if last_path.exists()
                    else "no checkpoint was written yet"
                )
                raise TrainingDivergedError(
                    f"loss became {loss_value} at epoch {epoch + 1}, step {step + 1}; stopping ({kept}). "
                    "Try a lower --lr or --grad-clip 1.0."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            global_step += 1
            loss_sum += loss_value * len(batch)
            samples += len(batch)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < len(batches):
                save_checkpoint(last_path, model, **snapshot(epoch, step + 1, loss_sum, samples))
        bar.close()
        preds = run_inference(
            model,
            val_set,
            batch_size=t.batch_size,
            device=device,
            workers=workers,
            progress=progress,
            desc="validating",
        )
        if not preds.ok.all():
            runlog.add_failures(data.val, [(i, e) for i, e in enumerate(preds.errors) if e])
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, samples)}
        row.update(validation_row(model, preds, data.val, loss_name))
        row.update({"lr": optimizer.param_groups[0]["lr"], "time_s": round(time.perf_counter() - started, 2)})
        value = row[f"val_{t.metric}"]
        improved = math.isfinite(value) and value > best_metric
        if improved:
            best_metric, best_epoch = value, epoch + 1
        runlog.add_epoch(row)
        save_checkpoint(last_path, model, **snapshot(epoch + 1, 0, 0.0, 0))
        if improved:
            save_checkpoint(best_path, model, **snapshot(epoch + 1, 0, 0.0, 0))
        log.info(
            "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_srcc %.4f  val_plcc %.4f  val_acc %.4f  %s  (%.1fs)",
            epoch + 1,
            t.epochs,
            row["train_loss"],
            row["val_loss"],
            row["val_srcc"],
            row["val_plcc"],
            row["val_acc"],
            "best" if improved else f"best {t.metric} {best_metric:.4f} @ {best_epoch}",
            row["time_s"],
        )
    if not best_path.exists():  # every validation metric was NaN: keep the last weights as the result
        save_checkpoint(best_path, model, **snapshot(t.epochs, 0, 0.0, 0))
    return {
        "run_dir": str(run_dir),
        "best_metric": best_metric,
        "best_epoch": best_epoch,
        "metric": t.metric,
        "best": str(best_path),
        "last": str(last_path),
        "metrics_csv": str(runlog.metrics_path),
    }
