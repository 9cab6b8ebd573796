"""The training loop: epochs, enhancers, validation, checkpoints, exact resume.

Randomness is a function of (seed, epoch, step): the shuffle of epoch e, the augmentation of each sample,
the dropout masks and the enhancers' draws of each step are derived from the run seed. A run killed at
any point and resumed from ``last.pt`` therefore ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from elta.config import RunConfig
from elta.data.cache import check_cache_fits
from elta.data.check import write_problems
from elta.data.dataset import AnnotationDataset, Batch, EpochBatchSampler, dist_columns
from elta.data.readers import AnnotationError
from elta.data.transforms import ImageTransform
from elta.engine.checkpoint import load_checkpoint, save_checkpoint
from elta.engine.distributed import SINGLE, Processes, start_processes, stop_processes
from elta.engine.features import load_or_compute_features
from elta.engine.inference import Predictions, default_workers, make_loader, run_inference
from elta.engine.precision import Precision, compile_backbone
from elta.engine.prepare import PreparedData, prepare_data, read_dataset
from elta.engine.runtime import resolve_device
from elta.enhancers import StepState, TrainingContext, build_enhancers
from elta.errors import RunExistsError, TrainingDivergedError
from elta.functional import emd_loss
from elta.metrics import emd as emd_metric
from elta.metrics import evaluate
from elta.models.model import AestheticModel, build_model
from elta.models.original import load_any_checkpoint
from elta.utils import atomic_write_text, derive_seed

__all__ = [
    "train",
    "TrainingDivergedError",
    "RunExistsError",
    "read_dataset",
    "main_loss",
    "loss_terms",
    "epoch_batches",
    "StepForward",
]

log = logging.getLogger(__name__)


def resolve_loss(name: str, has_distribution: bool) -> str:
    if name == "auto":
        return "emd" if has_distribution else "mse"
    if name == "emd" and not has_distribution:
        raise ValueError(
            "--loss emd needs vote distributions, and this dataset has only MOS: use --loss mse or l1"
        )
    return name


def targets_of(model: AestheticModel, batch: Batch, loss_name: str) -> torch.Tensor:
    """What the head is trained towards: the vote distribution, or the MOS scaled to [0, 1]."""
    if loss_name == "emd":
        return batch.dist
    lo, hi = model.score_range[0], model.score_range[1]
    return (batch.mos - lo) / (hi - lo)


def main_loss(
    model: AestheticModel,
    out,
    targets: torch.Tensor,
    weights: torch.Tensor,
    loss_name: str,
    weight_total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted mean of the per-sample EMD (distribution head) or squared / absolute error (scalar head).

    ``weight_total`` replaces the denominator ``weights.sum()``: in a distributed run, the global weight
    sum divided by the number of processes, so that the processes' averaged gradient is the global mean's.
    """
    if loss_name == "emd":
        per_sample = emd_loss(out.distribution, targets, reduction="none")
    elif loss_name == "mse":
        per_sample = F.mse_loss(out.score_unit, targets, reduction="none")
    else:
        per_sample = F.l1_loss(out.score_unit, targets, reduction="none")
    total = weights.sum() if weight_total is None else weight_total
    return (per_sample * weights).sum() / total.clamp_min(1e-12)


def loss_terms(
    model: AestheticModel,
    enhancers,
    features: torch.Tensor,
    batch: Batch,
    loss_name: str,
    epoch: int = 0,
    processes: Processes = SINGLE,
) -> dict[str, torch.Tensor]:
    """The losses of one training step from pooled ``features`` [B, D]: enhancers, head, main loss.

    Returns ``{"loss": total, "main": …, <enhancer terms>…}``; the total is what is back-propagated.
    An enhancer that replaces the main loss (``state.replace_main``) leaves ``main`` out of the total.
    In a distributed run ``batch`` is this process's share of the global batch (see
    :mod:`elta.engine.distributed`).
    """
    score_range = (float(model.spec.score_range[0]), float(model.spec.score_range[1]))
    weights = batch.weight.to(features.device) if batch.weight is not None else features.new_ones(len(batch))
    state = StepState(
        features,
        targets_of(model, batch, loss_name),
        batch.mos,
        weights,
        score_range,
        indices=batch.indices.to(features.device),
        epoch=epoch,
        gather=processes.gather_rows,
    )
    for enhancer in enhancers:
        state = enhancer(state)
    out = model.forward_head(state.features)
    for enhancer in enhancers:
        state = enhancer.after_head(state, out)
    terms = dict(state.losses)
    if not state.replace_main:
        weight_total = processes.mean(state.weights.sum()) if processes.distributed else None
        main = main_loss(model, out, state.targets, state.weights, loss_name, weight_total)
        terms = {"main": main, **terms}
    return {"loss": sum(terms.values()), **terms}


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
        order = torch.multinomial(
            sample_weights.double().cpu(), n, replacement=True, generator=generator
        ).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2].extend(batches.pop())
    return batches


def make_optimizer(model: AestheticModel, cfg: RunConfig, enhancers=None) -> torch.optim.Optimizer:
    """Adam or AdamW over the model's trainable parameters, plus the enhancers' own parameter groups
    (e.g. BMC's σ, with its own learning rate and no weight decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    if t.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    for enhancer in enhancers or []:
        for group in enhancer.param_groups():
            optimizer.add_param_group(group)
    return optimizer


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

    def __init__(self, run_dir: Path, problems: list[dict], write: bool = True) -> None:
        self.write = write  # False in the processes of a distributed run other than rank 0
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
        if self.write:
            atomic_write_text(self.metrics_path, pd.DataFrame(self.rows).to_csv(index=False))

    def add_failures(self, frame: pd.DataFrame, failures: list[tuple[int, str]]) -> None:
        """List rows whose image failed to load (each once, however many epochs meet it)."""
        known = {(p.get("path"), p.get("reason")) for p in self.problems}
        for index, reason in failures:
            record = frame.iloc[index]
            if (record["path"], reason) in known:
                continue
            known.add((record["path"], reason))
            self.problems.append(
                {
                    "file": record.get("source", ""),
                    "row": int(record.get("row", -1)),
                    "reason": reason,
                    "image_id": record["image_id"],
                    "path": record["path"],
                }
            )
        if self.write:
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
    Under torchrun (``torchrun --nproc-per-node N -m elta train …``) the processes train together (see
    :mod:`elta.engine.distributed`); rank 0 writes the run folder.
    """
    run_dir = Path(run_dir)
    processes, device, started = start_processes(cfg.runtime.device)
    try:
        last_path = run_dir / "last.pt"
        if last_path.exists() and not resume:
            raise RunExistsError(
                f"{run_dir} already holds a run (last.pt): use --resume {run_dir} or another --out"
            )
        handler = None
        if processes.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            handler = _attach_log_file(run_dir)
        processes.barrier()  # every process sees the same state of the run folder
        try:
            trainer = _Trainer(cfg, run_dir, progress and processes.is_main, on_epoch, processes, device)
            summary = trainer.fit(resume=resume and last_path.exists())
            processes.barrier()  # all processes are done before the group is taken down
            return summary
        finally:
            if handler is not None:
                logging.getLogger("elta").removeHandler(handler)
                handler.close()
    finally:
        if started:
            stop_processes()


def _initial_model(cfg: RunConfig, data: PreparedData, head: str, resumed: dict | None) -> AestheticModel:
    """The model before training: fresh (with cfg.model.weights), from --init-from, or the run's own last.pt.

    When starting from a checkpoint (``resumed`` or --init-from), its architecture and input pipeline
    (backbone, input size, resize, normalisation, interpolation) are kept.
    """
    groups = data.train["group"].astype(str)
    group_counts = {g: int(c) for g, c in groups[groups != ""].value_counts().items()}
    m = cfg.model
    if m.reset_head and not m.init_from:
        raise ValueError("--reset-head needs --init-from (a fresh model's head is new anyway)")
    source = None if resumed is not None or not m.init_from else load_any_checkpoint(m.init_from)
    start = resumed if resumed is not None else source
    backbone, image_size, resize = m.backbone, m.image_size, m.resize
    if start is not None:
        s = start["spec"]
        backbone, image_size, resize = s["backbone"], s["image_size"], s["resize"]
        if source is not None and backbone != m.backbone:
            log.info("--init-from %s: using its backbone %s", m.init_from, backbone)
    torch.manual_seed(derive_seed(cfg.train.seed, -1))  # the initial weights of new layers
    model = build_model(
        backbone,
        head,
        data.attrs["centers"],
        data.attrs["score_range"],
        weights="none" if start is not None else m.weights,
        image_size=image_size,
        resize=resize,
        neck_dim=m.neck_dim,
        dropout=m.dropout,
        acc_threshold=data.attrs.get("acc_threshold"),
        dataset_format=data.attrs.get("format", ""),
        group_counts=group_counts,
    )
    if start is not None:
        for key in ("mean", "std", "interpolation"):
            setattr(model.spec, key, start["spec"][key])
    if source is not None:
        _load_initial_weights(model, source, m.init_from, m.reset_head)
    if m.freeze_backbone:
        model.backbone.requires_grad_(False)
    return model


def _load_initial_weights(model: AestheticModel, source: dict, path: str, reset_head: bool) -> None:
    own = model.state_dict()
    state = {k: v for k, v in source["model"].items() if not (reset_head and k.startswith("head."))}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(
            f"--init-from {path}: {', '.join(mismatched[:3])} have other shapes than this model's "
            "(another number of bins or a new neck?): add --reset-head"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    new_layers = sorted({k.split(".")[0] for k in missing})
    if unexpected:
        raise ValueError(f"--init-from {path}: tensors this model does not have: {unexpected[:3]}")
    log.info("initialised from %s%s", path, f" (new: {', '.join(new_layers)})" if new_layers else "")


def _handle_batch_norm(model: AestheticModel, processes: Processes, device: torch.device) -> None:
    """Distributed runs on GPUs normalise over the global batch (SyncBatchNorm, in place)."""
    has_batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not processes.distributed or not has_batch_norm:
        return
    if device.type == "cuda":
        model.backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
        model.neck = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.neck)
        log.info("BatchNorm layers synchronised across the %d processes", processes.world_size)
    else:
        log.info(
            "BatchNorm on CPUs: each process normalises its share of the batch (SyncBatchNorm needs GPUs); "
            "rank 0's running statistics are given to all before validating and saving"
        )


def _sample_weights(enhancers, context: TrainingContext) -> torch.Tensor | None:
    """The product of the enhancers' sampling weights over training rows, or None (plain shuffling)."""
    weights = None
    for enhancer in enhancers:
        own = enhancer.sample_weights(context)
        if own is not None:
            weights = own.double() if weights is None else weights * own.double()
    return weights


class _Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        progress: bool,
        on_epoch=None,
        processes: Processes = SINGLE,
        device: torch.device | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.progress = progress
        self.on_epoch = on_epoch
        self.processes = processes
        self.device = device  # None: from cfg.runtime.device
        self.last_path, self.best_path = run_dir / "last.pt", run_dir / "best.pt"

    def fit(self, resume: bool) -> dict:
        cfg, t, processes = self.cfg, self.cfg.train, self.processes
        device = self.device or resolve_device(cfg.runtime.device)
        if processes.distributed and t.batch_size < processes.world_size:
            raise ValueError(
                f"--batch-size {t.batch_size} is the global batch, shared by {processes.world_size} "
                f"processes: give at least {processes.world_size}"
            )
        precision = Precision.create(
            cfg.runtime.amp, device, cfg.runtime.channels_last and not t.cache_features
        )
        if processes.is_main:
            cfg.to_yaml(self.run_dir / "config.yaml")
        data = prepare_data(cfg, self.run_dir, progress=self.progress, write=processes.is_main)
        loss_name = resolve_loss(t.loss, data.attrs["has_distribution"])
        head = "distribution" if loss_name == "emd" else "scalar"
        state = load_checkpoint(self.last_path) if resume else None
        model = precision.prepare(_initial_model(cfg, data, head, state).to(device))
        _handle_batch_norm(model, processes, device)
        enhancers = build_enhancers(cfg.enhancers)
        context = TrainingContext(
            scores=torch.tensor(data.train["mos"].to_numpy(dtype=np.float32)),
            groups=data.train["group"].astype(str).tolist(),
            score_range=(float(model.spec.score_range[0]), float(model.spec.score_range[1])),
            num_bins=model.spec.num_bins,
            loss=loss_name,
            feature_dim=model.spec.neck_dim or model.backbone.num_features,
            epochs=t.epochs,
        )
        for enhancer in enhancers:
            enhancer.setup(context)
        enhancers.to(device)
        sample_weights = _sample_weights(enhancers, context)
        workers = default_workers(device) if cfg.runtime.workers is None else cfg.runtime.workers
        if not t.cache_features:
            check_cache_fits(data.attrs["images_root"], model.spec.resize)
        train_set, val_set = self._datasets(model, data, device, workers)
        if cfg.runtime.compile and t.cache_features:
            log.info("--compile: nothing to compile, the backbone's features are cached")
        elif cfg.runtime.compile:
            compile_backbone(model)
        scaler = precision.grad_scaler()
        steps_per_epoch = len(epoch_batches(len(train_set), t.batch_size, t.seed, 0))
        optimizer = make_optimizer(model, cfg, enhancers)
        scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
        runlog = _RunLog(self.run_dir, data.problems, write=processes.is_main)
        progress_state = {
            "epoch": 0,
            "step": 0,
            "global_step": 0,
            "best_metric": -math.inf,
            "best_epoch": 0,
            "epoch_loss_sums": {},
            "epoch_samples": 0,
        }
        if state is not None:
            model.load_state_dict(state["model"])
            enhancers.load_state_dict(state.get("enhancers", {}))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler") and scaler.is_enabled():
                scaler.load_state_dict(state["scaler"])
            progress_state.update({k: state[k] for k in progress_state})
            runlog.restore(progress_state["epoch"])
            log.info(
                "resuming %s at epoch %d, step %d",
                self.run_dir,
                progress_state["epoch"] + 1,
                progress_state["step"],
            )
        log.info(
            "training %s (%s head, %s loss%s) on %d images, validating on %d; %d steps an epoch on %s (%s)%s",
            model.spec.backbone,
            head,
            loss_name,
            "".join(f", {e.name}" for e in enhancers),
            len(train_set),
            len(val_set),
            steps_per_epoch,
            device,
            precision.name,
            f"; {processes.world_size} processes share each batch of {t.batch_size}"
            if processes.distributed
            else "",
        )
        loop = _EpochLoop(
            self, model, enhancers, optimizer, scheduler, runlog, data, loss_name, device, workers,
            precision=precision, scaler=scaler, sample_weights=sample_weights,
        )  # fmt: skip
        return loop.run(train_set, val_set, progress_state)

    def _datasets(self, model, data, device, workers):
        cfg = self.cfg
        if not cfg.train.cache_features:
            train_set = AnnotationDataset(
                data.train, ImageTransform.from_spec(model.spec, train=True), seed=cfg.train.seed
            )
            val_set = AnnotationDataset(data.val, ImageTransform.from_spec(model.spec, train=False))
            return train_set, val_set
        cache_path = (
            Path(cfg.train.feature_cache) if cfg.train.feature_cache else self.run_dir / "feature_cache.pt"
        )
        weights_id = f"init:{cfg.model.init_from}" if cfg.model.init_from else f"weights:{cfg.model.weights}"
        processes = self.processes
        if not processes.is_main:
            processes.barrier()  # rank 0 computes and stores the features; the others then read them
        caches = load_or_compute_features(
            cache_path,
            model,
            {"train": data.train, "val": data.val},
            weights_id,
            batch_size=cfg.train.batch_size,
            device=device,
            workers=workers,
            progress=self.progress,
        )
        if processes.is_main:
            processes.barrier()
        train_set = AnnotationDataset(
            data.train, None, features=caches["train"].features, failed=caches["train"].failed
        )
        val_set = AnnotationDataset(
            data.val, None, features=caches["val"].features, failed=caches["val"].failed
        )
        return train_set, val_set


class StepForward(torch.nn.Module):
    """A training step's forward (features → enhancers → head → loss terms) as one module, so that
    DistributedDataParallel can wrap the model and the enhancers' parameters together.

    ``features(inputs)`` gives the pooled features [B, D] (the backbone under autocast, or the neck on
    cached features).
    """

    def __init__(
        self,
        model: AestheticModel,
        enhancers: torch.nn.ModuleList,
        features: Callable[[torch.Tensor], torch.Tensor],
        loss_name: str,
        processes: Processes = SINGLE,
    ) -> None:
        super().__init__()
        self.model, self.enhancers = model, enhancers
        self.features = features
        self.loss_name, self.processes = loss_name, processes

    def forward(self, images, mos, dist, weight, indices, epoch: int) -> dict[str, torch.Tensor]:
        batch = Batch(images=images, indices=indices, mos=mos, dist=dist, weight=weight)
        features = self.features(images)
        return loss_terms(
            self.model, self.enhancers, features, batch, self.loss_name, epoch=epoch, processes=self.processes
        )


class _EpochLoop:
    """The epochs of one run; holds the objects a step needs."""

    def __init__(
        self, trainer, model, enhancers, optimizer, scheduler, runlog, data, loss_name, device, workers,
        *, precision: Precision, scaler, sample_weights: torch.Tensor | None,
    ):  # fmt: skip
        self.trainer, self.cfg = trainer, trainer.cfg
        self.model, self.enhancers = model, enhancers
        self.optimizer, self.scheduler = optimizer, scheduler
        self.runlog, self.data = runlog, data
        self.loss_name, self.device, self.workers = loss_name, device, workers
        self.cached = self.cfg.train.cache_features
        self.precision, self.scaler = precision, scaler
        self.sample_weights = sample_weights  # per-row sampling weights, or None for plain shuffling
        self.processes = trainer.processes
        step = StepForward(model, enhancers, self.features, loss_name, self.processes)
        self.forward_step = self.processes.wrap(step, device)

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, D] in float32; the backbone (or the neck on cached features) under autocast."""
        forward = self.model.neck if self.cached else self.model.forward_features
        return self.precision.features(forward, inputs)

    def head_forward(self, inputs: torch.Tensor):
        return self.model.forward_head(self.features(inputs))

    def snapshot(self, p: dict) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "enhancers": self.enhancers.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.cfg.to_dict(),
            **p,
        }

    def step(self, batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        """One optimisation step; returns the loss terms (total first)."""
        batch.images = batch.images.to(self.device, non_blocking=True)
        batch.mos = batch.mos.to(self.device)
        batch.dist = batch.dist.to(self.device) if batch.dist is not None else None
        batch.weight = batch.weight.to(self.device) if batch.weight is not None else None
        batch.indices = batch.indices.to(self.device)
        terms = self.forward_step(batch.images, batch.mos, batch.dist, batch.weight, batch.indices, epoch)
        total = terms["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()  # the scaler is a pass-through unless --amp fp16
        if self.cfg.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return terms

    def run(self, train_set: AnnotationDataset, val_set: AnnotationDataset, p: dict) -> dict:
        t = self.cfg.train
        last_path, best_path = self.trainer.last_path, self.trainer.best_path
        progress = self.trainer.progress
        start_epoch = p["epoch"]
        # one loader for the whole run: its worker processes outlive the epochs
        sampler = EpochBatchSampler()
        loader = make_loader(
            train_set, t.batch_size, self.workers, self.device, persistent=True, batch_sampler=sampler
        )
        for epoch in tqdm(range(start_epoch, t.epochs), desc="epochs", unit="epoch", disable=not progress):
            started = time.perf_counter()
            self.model.train()
            if self.cfg.model.freeze_backbone:
                self.model.backbone.eval()  # frozen batch-norm statistics too
            batches = epoch_batches(len(train_set), t.batch_size, t.seed, epoch, self.sample_weights)
            first = p["step"] if epoch == start_epoch else 0
            sums = defaultdict(float, p["epoch_loss_sums"] if first else {})
            samples = p["epoch_samples"] if first else 0
            # each process's share of every batch (the whole batch in a single process)
            sampler.set_epoch(epoch, [self.processes.share(b) for b in batches[first:]])
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
                sizes = self._census(batch)  # every process's number of loaded samples
                if sum(sizes) < 2 or min(sizes) == 0:
                    if self.processes.distributed and sum(sizes) >= 2:
                        log.warning("step %d skipped: a process has no loadable image in its share", step + 1)
                    continue
                torch.manual_seed(self._step_seed(epoch, step))
                terms = self.step(batch, epoch)
                values = self._loss_values(terms)
                if not math.isfinite(values["loss"]):
                    kept = (
                        f"the last good checkpoint is {last_path}"
                        if last_path.exists()
                        else "no checkpoint was written yet"
                    )
                    raise TrainingDivergedError(
                        f"loss became {values['loss']} at epoch {epoch + 1}, step {step + 1}; stopping ({kept}). "
                        "Try a lower --lr or --grad-clip 1.0"
                        + (", or --amp off." if self.precision.dtype is not None else ".")
                    )
                p["global_step"] += 1
                for k, v in values.items():
                    sums[k] += v * sum(sizes)
                samples += sum(sizes)
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < len(batches):
                    p.update(epoch=epoch, step=step + 1, epoch_loss_sums=dict(sums), epoch_samples=samples)
                    self._save(last_path, p)
            bar.close()
            for enhancer in self.enhancers:
                enhancer.on_epoch_end(epoch)
            row = {"epoch": epoch + 1}
            row.update(
                {
                    ("train_loss" if k == "loss" else f"train_{k}"): v / max(1, samples)
                    for k, v in sums.items()
                }
            )
            row.update(self._validate(val_set))
            row.update(
                {
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "time_s": round(time.perf_counter() - started, 2),
                }
            )
            value = row[f"val_{t.metric}"]
            improved = math.isfinite(value) and value > p["best_metric"]
            if improved:
                p.update(best_metric=value, best_epoch=epoch + 1)
            self.runlog.add_epoch(row)
            p.update(epoch=epoch + 1, step=0, epoch_loss_sums={}, epoch_samples=0)
            self._save(last_path, p)
            if improved:
                self._save(best_path, p)
            log.info(
                "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_srcc %.4f  val_plcc %.4f  val_acc %.4f  %s  (%.1fs)",
                epoch + 1,
                t.epochs,
                row.get("train_loss", math.nan),
                row["val_loss"],
                row["val_srcc"],
                row["val_plcc"],
                row["val_acc"],
                "best" if improved else f"best {t.metric} {p['best_metric']:.4f} @ {p['best_epoch']}",
                row["time_s"],
            )
            if self.trainer.on_epoch is not None:
                self.trainer.on_epoch(epoch + 1, row)
        if p["best_epoch"] == 0:
            self._save(best_path, p)  # every validation metric was NaN: keep the last weights as the result
        return {
            "run_dir": str(self.trainer.run_dir),
            "best_metric": p["best_metric"],
            "best_epoch": p["best_epoch"],
            "metric": t.metric,
            "best": str(best_path),
            "last": str(last_path),
            "metrics_csv": str(self.runlog.metrics_path),
        }

    def _census(self, batch: Batch) -> list[int]:
        """Every process's number of loaded samples; reports the images that failed to load in any."""
        table = self.processes.all_counts([len(batch), len(batch.failures)], self.device)
        if any(failed for _, failed in table):
            failures = batch.failures
            if self.processes.distributed:
                failures = [f for part in self.processes.gather_objects(batch.failures) for f in part]
            self._report_failures(failures)
        return [size for size, _ in table]

    def _report_failures(self, failures: list[tuple[int, str]]) -> None:
        self.runlog.add_failures(self.data.train, failures)
        if self.processes.is_main:
            log.warning(
                "skipped %d unreadable training images (listed in %s)",
                len(failures),
                self.runlog.bad_rows_path,
            )
        if self.cfg.data.strict:
            raise AnnotationError(f"unreadable training image (strict mode): {failures[0][1]}")

    def _step_seed(self, epoch: int, step: int) -> int:
        """The seed of a step's draws (dropout, TFA); each process of a distributed run has its own."""
        if self.processes.distributed:
            return derive_seed(self.cfg.train.seed, epoch, step, 1, self.processes.rank)
        return derive_seed(self.cfg.train.seed, epoch, step, 1)

    def _loss_values(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """The step's loss terms as numbers; in a distributed run their means over the processes, which
        make up the global batch's values."""
        if not self.processes.distributed:
            return {k: float(v.detach()) for k, v in terms.items()}
        means = self.processes.mean(torch.stack([v.detach().float() for v in terms.values()]))
        return dict(zip(terms, means.tolist(), strict=True))

    def _save(self, path: Path, p: dict) -> None:
        """Write a checkpoint (rank 0), after giving every process rank 0's buffers."""
        self.processes.broadcast_buffers(self.model)
        if self.processes.is_main:
            save_checkpoint(path, self.model, **self.snapshot(p))

    def _validate(self, val_set: AnnotationDataset) -> dict:
        self.processes.broadcast_buffers(self.model)  # all processes score with the weights rank 0 saves
        preds = run_inference(
            self.model,
            val_set,
            batch_size=self.cfg.train.batch_size,
            device=self.device,
            workers=self.workers,
            progress=self.trainer.progress,
            desc="validating",
            forward=self.head_forward,
            processes=self.processes,
        )
        if not preds.ok.all():
            self.runlog.add_failures(self.data.val, [(i, e) for i, e in enumerate(preds.errors) if e])
        return validation_row(self.model, preds, self.data.val, self.loss_name)
