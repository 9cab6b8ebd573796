"""The training loop: one :class:`TrainState`, built by :func:`setup`; :func:`fit` runs the epochs, each a
series of :func:`step` calls followed by :func:`validate`. The main loss is the head's own
(:mod:`elta.models.heads`); enhancers act between the features and the head.

Randomness is a function of (seed, epoch, step): the shuffle of epoch e, the augmentation of each sample,
the dropout masks and the enhancers' draws of each step are derived from the run seed. A run killed at
any point and resumed from ``last.pt`` therefore ends with the same weights as an uninterrupted one.
Under torchrun the processes share each batch (:mod:`elta.engine.distributed`); rank 0 writes the files.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from elta.config import RunConfig
from elta.data.cache import check_cache_fits
from elta.data.check import write_problems
from elta.data.dataset import AnnotationDataset, Batch, EpochBatchSampler, dist_columns
from elta.data.transforms import ImageTransform
from elta.engine.distributed import SINGLE, Processes, start_processes, stop_processes
from elta.engine.features import load_or_compute_features
from elta.engine.precision import compile_backbone
from elta.engine.predictor import Predictor
from elta.engine.prepare import PreparedData, prepare_data
from elta.engine.runtime import Runtime
from elta.enhancers import StepState, TrainingContext, build_enhancers, scalar_head_users
from elta.errors import (
    AnnotationError,
    ConfigError,
    IncompatibleDataError,
    RunExistsError,
    TrainingDivergedError,
    UnavailableError,
)
from elta.metrics import evaluate
from elta.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from elta.models.heads import ModelOutput, resolve_loss
from elta.models.model import AestheticModel, build_model, score_quantiles
from elta.progress import progress_bar
from elta.utils import atomic_write_text, derive_seed

__all__ = [
    "train",
    "TrainState",
    "setup",
    "update_ema",
    "fit",
    "step",
    "validate",
    "loss_terms",
    "main_loss",
    "epoch_batches",
    "StepForward",
]

log = logging.getLogger(__name__)

# the progress counters of TrainState that last.pt keeps
PROGRESS = ("epoch", "step", "global_step", "best_metric", "best_epoch", "epoch_loss_sums", "epoch_samples")


# --- one step's losses --------------------------------------------------------------------------------


def main_loss(
    head: nn.Module,
    out: ModelOutput,
    targets: torch.Tensor,
    weights: torch.Tensor,
    weight_total: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weighted mean of the head's per-sample loss.

    ``weight_total`` replaces the denominator ``weights.sum()``: in a distributed run, the global weight
    sum divided by the number of processes, so that the processes' averaged gradient is the global mean's.
    """
    total = weights.sum() if weight_total is None else weight_total
    return (head.loss(out, targets) * weights).sum() / total.clamp_min(1e-12)


def loss_terms(
    model: AestheticModel,
    enhancers: nn.ModuleList,
    features: torch.Tensor,
    batch: Batch,
    epoch: int = 0,
    processes: Processes = SINGLE,
) -> dict[str, torch.Tensor]:
    """The losses of one training step from pooled ``features`` [B, D]: enhancers, head, main loss.

    Returns ``{"loss": total, "main": …, <enhancer terms>…}``; the total is what is back-propagated.
    An enhancer that replaces the main loss (``state.replace_main``) leaves ``main`` out of the total.
    In a distributed run ``batch`` is this process's share of the global batch.
    """
    head = model.head
    weights = batch.weight.to(features.device) if batch.weight is not None else features.new_ones(len(batch))
    score_range = (float(model.spec.score_range[0]), float(model.spec.score_range[1]))
    extra = {"indices": batch.indices.to(features.device), "epoch": epoch, "gather": processes.gather_rows}
    state = StepState(features, head.targets(batch.mos, batch.dist), batch.mos, weights, score_range, **extra)
    for enhancer in enhancers:
        state = enhancer(state)
    out = model.forward_head(state.features)
    for enhancer in enhancers:
        state = enhancer.after_head(state, out)
    terms = dict(state.losses)
    if not state.replace_main:
        weight_total = processes.mean(state.weights.sum()) if processes.distributed else None
        terms = {"main": main_loss(head, out, state.targets, state.weights, weight_total), **terms}
    return {"loss": sum(terms.values()), **terms}


class StepForward(nn.Module):
    """A step's forward (features → enhancers → head → loss terms) as one module, so that
    DistributedDataParallel wraps the model and the enhancers' parameters together.
    ``features(inputs)`` gives the pooled features [B, D]."""

    def __init__(self, model, enhancers, features: Callable, processes: Processes = SINGLE) -> None:
        super().__init__()
        self.model, self.enhancers, self.features, self.processes = model, enhancers, features, processes

    def forward(self, images, mos, dist, weight, indices, epoch: int) -> dict[str, torch.Tensor]:
        batch = Batch(images=images, indices=indices, mos=mos, dist=dist, weight=weight)
        return loss_terms(self.model, self.enhancers, self.features(images), batch, epoch, self.processes)


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, sample_weights: torch.Tensor | None = None
) -> list[list[int]]:
    """The shuffled batches of one epoch; a last batch of one sample joins the one before it.

    With ``sample_weights`` [n] the epoch draws n rows with replacement, each with probability ∝ its weight.
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 0))
    if sample_weights is None:
        order = torch.randperm(n, generator=generator).tolist()
    else:
        weights = sample_weights.double().cpu()
        order = torch.multinomial(weights, n, replacement=True, generator=generator).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2].extend(batches.pop())
    return batches


# --- the state of a run ----------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything a run holds; the progress counters and the log are saved in ``last.pt`` / metrics.csv."""

    cfg: RunConfig
    run_dir: Path
    data: PreparedData
    model: AestheticModel
    enhancers: nn.ModuleList
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    runtime: Runtime  # device, precision, loader processes, progress, the processes of a torchrun job
    train_set: AnnotationDataset
    val_set: AnnotationDataset
    sample_weights: torch.Tensor | None  # per-row sampling weights, None: plain shuffling
    forward: nn.Module | None = None  # StepForward (under DistributedDataParallel in a distributed run)
    ema: AestheticModel | None = None  # --ema: the weights' moving average, validated, kept in best.pt
    # progress: completed epochs, batches done in the current epoch, optimizer steps in all
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = 0
    epoch_loss_sums: dict[str, float] = field(default_factory=dict)  # loss × samples, this epoch so far
    epoch_samples: int = 0
    rows: list[dict] = field(default_factory=list)  # metrics.csv, one row an epoch
    board: Any = None  # a TensorBoard SummaryWriter with --log-to tensorboard (rank 0)
    problems: list[dict] = field(default_factory=list)  # bad_rows.csv

    @property
    def processes(self) -> Processes:
        return self.runtime.processes

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    @property
    def kept_model(self) -> AestheticModel:
        """The weights a run validates and keeps in best.pt: the moving average with --ema, else the model."""
        return self.model if self.ema is None else self.ema

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, D] in float32: the backbone (or the neck on cached features) under autocast."""
        forward = self.model.neck if self.cfg.train.cache_features else self.model.forward_features
        return self.runtime.precision.features(forward, inputs)


# --- the loop ------------------------------------------------------------------------------------------


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = False,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train per ``cfg`` into ``run_dir``; with ``resume`` continue from ``run_dir/last.pt``.

    ``on_epoch(epoch, row)`` is called after each epoch's checkpoints are written, with the 1-based epoch
    and its metrics.csv row (e.g. to report to a tuner, which may stop the run by raising).
    Returns a summary: best metric and epoch, paths of best.pt / last.pt / metrics.csv.
    Under torchrun (``torchrun --nproc-per-node N -m elta train …``) the processes train together.
    """
    run_dir = Path(run_dir)
    processes, device, started = start_processes(cfg.runtime.device)
    handler = None
    try:
        if (run_dir / "last.pt").exists() and not resume:
            raise RunExistsError(
                f"{run_dir} already holds a run (last.pt): use --resume {run_dir} or another --out"
            )
        if processes.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            handler = _attach_log_file(run_dir)
        processes.barrier()  # every process sees the same state of the run folder
        resume = resume and (run_dir / "last.pt").exists()
        progress = progress and processes.is_main
        state = setup(cfg, run_dir, resume=resume, progress=progress, processes=processes, device=device)
        summary = fit(state, on_epoch)
        processes.barrier()  # all processes are done before the group is taken down
        return summary
    finally:
        if handler is not None:
            logging.getLogger("elta").removeHandler(handler)
            handler.close()
        if started:
            stop_processes()


def fit(state: TrainState, on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """Run the remaining epochs: steps, validation, metrics.csv, last.pt and best.pt; returns the summary."""
    cfg, t = state.cfg, state.cfg.train
    # one loader for the whole run: its worker processes outlive the epochs
    sampler = EpochBatchSampler()
    loader = state.runtime.loader(state.train_set, persistent=True, batch_sampler=sampler)
    epochs = range(state.epoch, t.epochs)
    for epoch in progress_bar(epochs, desc="epochs", unit="epoch", enabled=state.runtime.progress):
        started = time.perf_counter()
        state.model.train()
        if cfg.model.freeze_backbone:
            state.model.backbone.eval()  # frozen batch-norm statistics too
        batches = epoch_batches(len(state.train_set), t.batch_size, t.seed, epoch, state.sample_weights)
        # each process's share of every batch (the whole batch in a single process)
        sampler.set_epoch(epoch, [state.processes.share(b) for b in batches[state.step :]])
        bar = progress_bar(loader, desc=f"epoch {epoch + 1}", total=len(batches), initial=state.step, unit="batch",
                           enabled=state.runtime.progress)  # fmt: skip
        for batch in bar:
            values = step(state, batch)
            state.step += 1
            if values is not None:
                bar.set_postfix(loss=f"{values['loss']:.4f}")
            if t.checkpoint_every and state.step % t.checkpoint_every == 0 and state.step < len(batches):
                save(state, state.last_path)
        bar.close()
        for enhancer in state.enhancers:
            enhancer.on_epoch_end(epoch)
        samples = max(1, state.epoch_samples)
        row = {"epoch": epoch + 1}
        row.update({f"train_{k}": v / samples for k, v in state.epoch_loss_sums.items()})
        row.update(validate(state))
        row.update(lr=state.optimizer.param_groups[0]["lr"], time_s=round(time.perf_counter() - started, 2))
        value = row[f"val_{t.metric}"]
        improved = math.isfinite(value) and value > state.best_metric
        if improved:
            state.best_metric, state.best_epoch = value, epoch + 1
        state.rows.append(row)
        if state.processes.is_main:
            atomic_write_text(state.run_dir / "metrics.csv", pd.DataFrame(state.rows).to_csv(index=False))
        if state.board is not None:
            for key, value in row.items():
                if key != "epoch" and math.isfinite(value):
                    state.board.add_scalar(key, value, epoch + 1)
            state.board.flush()
        state.epoch, state.step, state.epoch_loss_sums, state.epoch_samples = epoch + 1, 0, {}, 0
        save(state, state.last_path)
        if improved:
            save(state, state.best_path, full=False)
        log.info(
            "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_srcc %.4f  val_plcc %.4f  val_acc %.4f  %s  "
            "(%.1fs)",
            epoch + 1, t.epochs, row.get("train_loss", math.nan), row["val_loss"], row["val_srcc"],
            row["val_plcc"], row["val_acc"],
            "best" if improved else f"best {t.metric} {state.best_metric:.4f} @ {state.best_epoch}",
            row["time_s"],
        )  # fmt: skip
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
    if state.best_epoch == 0:
        save(state, state.best_path, full=False)  # every validation metric was NaN: keep the last weights
    if state.board is not None:
        state.board.close()
    files = {"best": "best.pt", "last": "last.pt", "metrics_csv": "metrics.csv"}
    summary = dict(run_dir=str(state.run_dir), best_metric=state.best_metric, best_epoch=state.best_epoch)
    return {**summary, "metric": t.metric, **{key: str(state.run_dir / name) for key, name in files.items()}}


def step(state: TrainState, batch: Batch) -> dict[str, float] | None:
    """One optimisation step on batch ``state.step`` of epoch ``state.epoch``; adds its loss terms to the
    epoch's sums. Returns the terms as numbers (means over the processes in a distributed run), or None
    when the batch has fewer than two loaded images (or a process has none) and is skipped."""
    processes, t = state.processes, state.cfg.train
    # every process's numbers of loaded and of failed samples; unreadable images are reported
    table = processes.all_counts([len(batch), len(batch.failures)], state.runtime.device)
    if any(failed for _, failed in table):
        failures = [f for part in processes.gather_objects(batch.failures) for f in part]
        _list_bad_rows(state, state.data.train, failures)
        if processes.is_main:
            log.warning("skipped %d unreadable training images (listed in bad_rows.csv)", len(failures))
        if state.cfg.data.strict:
            raise AnnotationError(f"unreadable training image (strict mode): {failures[0][1]}")
    sizes = [size for size, _ in table]
    if sum(sizes) < 2 or min(sizes) == 0:
        if processes.distributed and sum(sizes) >= 2:
            log.warning("step %d skipped: a process has no loadable image in its share", state.step + 1)
        return None
    # the seed of the step's draws (dropout, TFA); each process of a distributed run has its own
    rank = (processes.rank,) if processes.distributed else ()
    torch.manual_seed(derive_seed(t.seed, state.epoch, state.step, 1, *rank))
    to = state.runtime.device
    weight, dist = (None if x is None else x.to(to) for x in (batch.weight, batch.dist))
    images = batch.images.to(to, non_blocking=True)
    terms = state.forward(images, batch.mos.to(to), dist, weight, batch.indices.to(to), state.epoch)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(terms["loss"]).backward()  # the scaler is a pass-through unless --amp fp16
    if t.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), t.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    if state.ema is not None:
        update_ema(state.ema, state.model, t.ema, state.global_step)
    values = processes.mean(torch.stack([v.detach().float() for v in terms.values()]))
    values = dict(zip(terms, values.tolist(), strict=True))
    if not math.isfinite(values["loss"]):
        last = state.last_path
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        amp = ", or --amp off" if state.runtime.precision.dtype is not None else ""
        raise TrainingDivergedError(
            f"loss became {values['loss']} at epoch {state.epoch + 1}, step {state.step + 1}; "
            f"stopping ({kept}). Try a lower --lr or --grad-clip 1.0{amp}."
        )
    state.global_step += 1
    for k, v in values.items():
        state.epoch_loss_sums[k] = state.epoch_loss_sums.get(k, 0.0) + v * sum(sizes)
    state.epoch_samples += sum(sizes)
    return values


def update_ema(ema: nn.Module, model: nn.Module, decay: float, steps: int) -> None:
    """Move ``ema`` towards ``model``: e ← e + (1 − d)(p − e), with d = min(decay, (1 + steps) / (10 + steps))
    so that the first steps are not averaged with the initial weights; integer buffers are copied."""
    d = min(decay, (1 + steps) / (10 + steps))
    with torch.no_grad():
        pairs = [*zip(ema.parameters(), model.parameters(), strict=True)]
        pairs += zip(ema.buffers(), model.buffers(), strict=True)
        for mine, theirs in pairs:
            if mine.is_floating_point():
                mine.lerp_(theirs, 1.0 - d)
            else:
                mine.copy_(theirs)


def validate(state: TrainState) -> dict:
    """Validation loss (the head's, on the predictions) and metrics, on the rows whose images loaded."""
    model, processes = state.kept_model, state.processes
    processes.broadcast_buffers(model)  # all processes score with the weights rank 0 saves
    preds = Predictor(model, state.runtime).predict(state.val_set, desc="validating")
    frame, ok, spec = state.data.val, preds.ok, model.spec
    if not ok.all():
        _list_bad_rows(state, frame, [(i, e) for i, e in enumerate(preds.errors) if e])
    gt, pred = frame["mos"].to_numpy(dtype=np.float64)[ok], preds.score[ok]
    cols = dist_columns(frame)
    pred_dist = preds.dist[ok] if preds.dist is not None else None
    gt_dist = frame[cols].to_numpy(dtype=np.float64)[ok] if cols and pred_dist is not None else None
    scale = {"threshold": spec.acc_threshold, "score_range": tuple(spec.score_range)}
    metrics = evaluate(pred, gt, pred_dist=pred_dist, gt_dist=gt_dist, **scale)
    row = {"val_loss": model.head.prediction_loss(pred, pred_dist, gt, gt_dist)}
    return row | {f"val_{k}": v for k, v in metrics.items() if k != "n"}


def save(state: TrainState, path: Path, full: bool = True) -> None:
    """Write a checkpoint (rank 0), after giving every process rank 0's buffers. Its weights are the ones
    validation scores (the moving average with --ema). ``full``: also everything a resume needs (optimizer,
    scheduler, scaler, enhancers, progress, and with --ema the trained weights); else only the weights, spec,
    config and the epoch they are from (best.pt)."""
    state.processes.broadcast_buffers(state.model)
    if state.ema is not None:
        state.processes.broadcast_buffers(state.ema)
    if not state.processes.is_main:
        return
    training = {"epoch": state.epoch, "best_metric": state.best_metric}
    if full:
        training |= {"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict()}
        training |= {"raw_weights": state.model.state_dict()} if state.ema is not None else {}
        training |= {"scaler": state.scaler.state_dict(), "enhancers": state.enhancers.state_dict()}
        training |= {k: getattr(state, k) for k in PROGRESS}
    save_checkpoint(path, state.kept_model, config=state.cfg.to_dict(), training=training)


def _restore(state: TrainState, checkpoint: Checkpoint) -> None:
    """Continue from ``checkpoint`` (the run's last.pt; its weights are in the model since
    :func:`_initial_model`): optimizer, scheduler, scaler, enhancers, progress and the metrics.csv rows of the
    completed epochs."""
    saved = checkpoint.training
    state.enhancers.load_state_dict(saved.get("enhancers", {}))
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.ema is not None:  # the checkpoint's weights are the average, the model's its raw_weights
        state.ema.load_state_dict(checkpoint.weights)
    state.scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler") and state.scaler.is_enabled():
        state.scaler.load_state_dict(saved["scaler"])
    for key in PROGRESS:
        setattr(state, key, saved[key])
    metrics = state.run_dir / "metrics.csv"
    if metrics.is_file():
        old = pd.read_csv(metrics)
        state.rows = old[old["epoch"] <= state.epoch].to_dict("records")
    log.info("resuming %s at epoch %d, step %d", state.run_dir, state.epoch + 1, state.step)


def _list_bad_rows(state: TrainState, frame: pd.DataFrame, failures: list[tuple[int, str]]) -> None:
    """Add rows whose image failed to load to bad_rows.csv, each once however many epochs meet it."""
    known = {(p.get("path"), p.get("reason")) for p in state.problems}
    for index, reason in failures:
        record = frame.iloc[index]
        if (record["path"], reason) in known:
            continue
        known.add((record["path"], reason))
        where = {"file": record.get("source", ""), "row": int(record.get("row", -1)), "reason": reason}
        state.problems.append({**where, "image_id": record["image_id"], "path": record["path"]})
    if state.processes.is_main:
        write_problems(state.problems, state.run_dir / "bad_rows.csv")


# --- setup -----------------------------------------------------------------------------------------------


def setup(
    cfg: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = False,
    processes: Processes = SINGLE,
    device: torch.device | None = None,
) -> TrainState:
    """Build a run's state: data, model, enhancers, datasets, optimizer, schedule; ``resume`` continues
    from ``run_dir/last.pt``. ``device`` None: from the runtime settings."""
    t = cfg.train
    # the config's runtime (on torchrun's device in a distributed run), batches of train.batch_size
    channels_last = cfg.runtime.channels_last and not t.cache_features  # cached features: no images
    overrides = dict(processes=processes, batch_size=t.batch_size, channels_last=channels_last)
    overrides["device"] = cfg.runtime.device if device is None else device
    runtime = Runtime.from_config(cfg.runtime, progress=progress, **overrides)
    device, precision = runtime.device, runtime.precision
    if processes.distributed and t.batch_size < processes.world_size:
        raise ConfigError(
            f"--batch-size {t.batch_size} is the global batch, shared by {processes.world_size} "
            f"processes: give at least {processes.world_size}"
        )
    data = prepare_data(cfg, run_dir, progress=progress, write=processes.is_main)
    info = data.info
    loss = resolve_loss(t.loss, info.has_distribution, scalar_head_users(cfg.enhancers))
    saved = load_checkpoint(run_dir / "last.pt") if resume else None
    model = precision.prepare(_initial_model(cfg, data, loss, saved).to(device))
    # the recipe's values for the unset settings, by the backbone trained (--init-from's own)
    cfg = cfg.resolved(model.spec.backbone)
    t = cfg.train
    if processes.is_main:
        cfg.to_yaml(run_dir / "config.yaml")
    processes.sync_batch_norm(model, device)
    enhancers = build_enhancers(cfg.enhancers)
    spec = model.spec
    scores = torch.tensor(data.train["mos"].to_numpy(dtype=np.float32))
    score_range = (float(spec.score_range[0]), float(spec.score_range[1]))
    feature_dim = spec.neck_dim or model.backbone.num_features
    groups = data.train["group"].astype(str).tolist()
    context = TrainingContext(scores, groups, score_range, spec.num_bins, loss, feature_dim, t.epochs)
    sample_weights = None  # the product of the enhancers' sampling weights
    for enhancer in enhancers:
        enhancer.setup(context)
        own = enhancer.sample_weights(context)
        if own is not None:
            sample_weights = own.double() if sample_weights is None else sample_weights * own.double()
    enhancers.to(device)
    if not t.cache_features:
        check_cache_fits(info.images_root, model.spec.resize)
    train_set, val_set = _datasets(cfg, run_dir, model, data, runtime)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if t.ema > 0 else None
    if runtime.compile and t.cache_features:
        log.info("--compile: nothing to compile, the backbone's features are cached")
    elif runtime.compile:
        compile_backbone(model)
    optimizer = _optimizer(model, cfg, enhancers)
    steps_per_epoch = len(epoch_batches(len(train_set), t.batch_size, t.seed, 0))
    state = TrainState(
        cfg=cfg, run_dir=run_dir, data=data, model=model, enhancers=enhancers, optimizer=optimizer,
        scheduler=_scheduler(optimizer, cfg, steps_per_epoch), scaler=precision.grad_scaler(),
        runtime=runtime, train_set=train_set, val_set=val_set, sample_weights=sample_weights,
        problems=list(data.problems), ema=ema,
    )  # fmt: skip
    state.forward = processes.wrap(StepForward(model, enhancers, state.features, processes), device)
    if saved is not None:
        _restore(state, saved)
    if t.log_to == "tensorboard" and processes.is_main:
        state.board = _tensorboard(run_dir, first_epoch=state.epoch + 1)
    log.info(
        "training %s (%s head, %s loss%s) on %d images, validating on %d; %d steps an epoch on %s (%s)%s",
        model.spec.backbone, model.spec.head, loss, "".join(f", {e.name}" for e in enhancers),
        len(train_set), len(val_set), steps_per_epoch, device, precision.name,
        f"; {processes.world_size} processes share each batch of {t.batch_size}" if processes.distributed
        else "",
    )  # fmt: skip
    return state


def _optimizer(model: AestheticModel, cfg: RunConfig, enhancers: nn.ModuleList) -> torch.optim.Optimizer:
    """Adam or AdamW: the neck and head at lr, the backbone at lr × backbone_lr_scale (each earlier layer
    × layer_decay more when < 1, timm's layer groups), plus the enhancers' own groups (e.g. BMC's σ)."""
    t = cfg.train
    backbone_lr = t.lr * t.backbone_lr_scale
    head = [p for part in (model.neck, model.head) for p in part.parameters() if p.requires_grad]
    if t.layer_decay < 1.0:
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(
            model.backbone, weight_decay=t.weight_decay, layer_decay=t.layer_decay
        )
        for group in groups:
            group["lr"] = backbone_lr * group.pop("lr_scale")
    else:
        groups = [{"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": backbone_lr}]
    groups = [g for g in groups if g["params"]] + [{"params": head}]
    kind = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    optimizer = kind(groups, lr=t.lr, weight_decay=t.weight_decay)
    for enhancer in enhancers:
        for group in enhancer.param_groups():
            optimizer.add_param_group(group)
    return optimizer


def _scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, steps_per_epoch: int):
    """Per-step schedule: linear warm-up, then constant or cosine to zero."""
    total = max(1, cfg.train.epochs * steps_per_epoch)
    warmup = int(round(cfg.train.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.train.schedule != "cosine":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _initial_model(cfg: RunConfig, data: PreparedData, loss: str, saved: Checkpoint | None) -> AestheticModel:
    """The model before training: fresh (with cfg.model.weights), from --init-from, or the run's own last.pt.

    When starting from a checkpoint (``saved`` or --init-from), its architecture and input pipeline
    (backbone, input size, resize, normalisation, interpolation) are kept.
    """
    info = data.info
    groups = data.train["group"].astype(str)
    group_counts = {g: int(c) for g, c in groups[groups != ""].value_counts().items()}
    m = cfg.model
    if m.reset_head and not m.init_from:
        raise ConfigError("--reset-head needs --init-from (a fresh model's head is new anyway)")
    source = None if saved is not None or not m.init_from else load_checkpoint(m.init_from)
    start = saved if saved is not None else source
    kept = m if start is None else start.spec  # a checkpoint's architecture and input size
    backbone, image_size, resize = kept.backbone, kept.image_size, kept.resize
    if source is not None and backbone != m.backbone:
        log.info("--init-from %s: using its backbone %s", m.init_from, backbone)
    head = "distribution" if loss == "emd" else "scalar"
    geometry = {"image_size": image_size, "resize": resize, "neck_dim": m.neck_dim, "dropout": m.dropout}
    facts = {"acc_threshold": info.acc_threshold, "dataset_format": info.format, "group_counts": group_counts}
    facts["score_quantiles"] = score_quantiles(data.train["mos"])
    weights = "none" if start is not None else m.weights
    torch.manual_seed(derive_seed(cfg.train.seed, -1))  # the initial weights of new layers
    model = build_model(
        backbone, head, info.centers, info.score_range, weights=weights, loss=loss, **geometry, **facts
    )
    if start is not None:
        for key in ("mean", "std", "interpolation"):
            setattr(model.spec, key, getattr(start.spec, key))
    if source is not None:
        _load_initial_weights(model, source, m.init_from, m.reset_head)
    if saved is not None:  # before the datasets: a feature cache is keyed by these backbone weights
        model.load_state_dict(saved.training.get("raw_weights", saved.weights))  # with --ema: not the average
    if m.freeze_backbone:
        model.backbone.requires_grad_(False)
    return model


def _load_initial_weights(model: AestheticModel, source: Checkpoint, path: str, reset_head: bool) -> None:
    own = model.state_dict()
    state = {k: v for k, v in source.weights.items() if not (reset_head and k.startswith("head."))}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise IncompatibleDataError(
            f"--init-from {path}: {', '.join(mismatched[:3])} have other shapes than this model's "
            "(another number of bins or a new neck?): add --reset-head"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    new_layers = sorted({k.split(".")[0] for k in missing})
    if unexpected:
        raise ConfigError(f"--init-from {path}: tensors this model does not have: {unexpected[:3]}")
    log.info("initialised from %s%s", path, f" (new: {', '.join(new_layers)})" if new_layers else "")


def _datasets(cfg: RunConfig, run_dir: Path, model: AestheticModel, data: PreparedData, runtime: Runtime):
    """The training and validation sets: images through the model's transforms, or cached features of a
    frozen backbone (computed once by rank 0, stored in the run folder or --feature-cache)."""
    t = cfg.train
    if not t.cache_features:
        train, val = (ImageTransform.from_spec(model.spec, train=flag) for flag in (True, False))
        return AnnotationDataset(data.train, train, seed=t.seed), AnnotationDataset(data.val, val)
    cache_path = Path(t.feature_cache) if t.feature_cache else run_dir / "feature_cache.pt"
    processes = runtime.processes
    if not processes.is_main:
        processes.barrier()  # rank 0 computes and stores the features; the others then read them
    frames = {"train": data.train, "val": data.val}
    caches = load_or_compute_features(cache_path, Predictor(model, runtime), frames)
    if processes.is_main:
        processes.barrier()
    return tuple(
        AnnotationDataset(frame, None, features=caches[name].features, failed=caches[name].failed)
        for name, frame in frames.items()
    )


def _tensorboard(run_dir: Path, first_epoch: int):
    """A SummaryWriter in RUN_DIR/tensorboard; events from ``first_epoch`` on (left by a killed run) are purged."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UnavailableError(
            "--log-to tensorboard needs the tensorboard package: pip install tensorboard"
        ) from exc
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=first_epoch)


def _attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("elta")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)  # train.log holds the INFO lines whatever the console shows
    return handler
