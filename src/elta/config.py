"""Run configuration: nested dataclasses, validated on creation, loadable from and saved as YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DataConfig", "ModelConfig", "TrainConfig", "RunConfig", "PAPER_BACKBONE"]

PAPER_BACKBONE = "swinv2_base_window8_256"
LOSSES = ("auto", "emd", "mse", "l1")
METRICS = ("srcc", "plcc", "acc")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
FORMATS = ("auto", "ava", "elta-csv", "csv", "koniq", "para", "aadb")
AMP_MODES = ("auto", "bf16", "fp16", "off")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'≥' if allow_zero else '>'} 0; got {value!r}")


@dataclass
class DataConfig:
    """Where the annotations and images are, and how to read them."""

    data: str | None = None  # annotation file, or a folder holding the dataset's files
    images: str | None = None  # image root; None = the format's usual folder next to the annotations
    format: str = "auto"
    splits: str | None = None  # folder with train.txt / val.txt / test.txt (AVA)
    val_fraction: float = 0.1  # held out of train when the dataset has no validation split
    strict: bool = False  # any bad row is an error instead of a reported skip
    image_column: str | None = None  # generic CSV column names (None = recognise common names)
    mos_column: str | None = None
    split_column: str | None = None
    group_column: str | None = None
    score_range: tuple[float, float] | None = None  # generic CSV without a known scale
    workers: int | None = None  # data-loading processes; None = chosen from the CPU count
    pseudo_labels: str | None = None  # CSV from `elta pseudo-label`, added to the training rows
    pseudo_weight: float = 1.0  # loss weight of pseudo-labelled rows (a row's own `weight` column wins)

    def __post_init__(self) -> None:
        _check_choice("data.format", self.format, FORMATS)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1); got {self.val_fraction}")
        if self.score_range is not None:
            lo, hi = (float(v) for v in self.score_range)
            if not lo < hi:
                raise ValueError(
                    f"data.score_range must be [low, high] with low < high; got {self.score_range}"
                )
            self.score_range = (lo, hi)
        if self.workers is not None:
            _check_positive("data.workers", self.workers, allow_zero=True)
        _check_positive("data.pseudo_weight", self.pseudo_weight, allow_zero=True)


@dataclass
class ModelConfig:
    """Backbone, input geometry and head."""

    backbone: str = PAPER_BACKBONE
    weights: str = "imagenet"  # imagenet | none | path to a weights file
    image_size: int | None = None  # None = the backbone's pretrained input size
    resize: int | None = None  # square resize before the random crop; None = image_size · 300/256
    neck_dim: int = 0  # > 0 adds Linear(D, neck_dim) + ReLU before the head
    dropout: float = 0.75  # before the scalar head (the original's "mse" mode)
    init_from: str | None = None  # start from this checkpoint's weights (elta or original ELTA release)
    freeze_backbone: bool = False  # train only the neck and head (regressor retraining)
    reset_head: bool = False  # re-initialise the head after --init-from

    def __post_init__(self) -> None:
        if self.image_size is not None:
            _check_positive("model.image_size", self.image_size)
        if self.resize is not None:
            _check_positive("model.resize", self.resize)
            if self.image_size is not None and self.resize < self.image_size:
                raise ValueError(
                    f"model.resize ({self.resize}) must be ≥ model.image_size ({self.image_size})"
                )
        _check_positive("model.neck_dim", self.neck_dim, allow_zero=True)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1); got {self.dropout}")


@dataclass
class TrainConfig:
    """Optimisation. Defaults are the paper's: Adam, lr 1e-5, batch 48, 20 epochs, constant lr."""

    epochs: int = 20
    batch_size: int = 48
    lr: float = 1e-5
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    loss: str = "auto"  # auto = emd when the dataset has vote distributions, else mse
    metric: str = "srcc"  # validation metric that picks best.pt
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 0  # also write last.pt every N steps inside an epoch; 0 = at epoch ends only
    cache_features: bool = False  # frozen backbone: compute pooled features once, train the head on them
    feature_cache: str | None = None  # cache file; None = RUN_DIR/feature_cache.pt
    amp: str = "auto"  # autocast of the model forward: auto = bf16 on CUDA GPUs that support it, else off
    channels_last: bool = False  # model and images in torch.channels_last memory format
    compile: bool = False  # torch.compile the backbone

    def __post_init__(self) -> None:
        _check_positive("train.epochs", self.epochs)
        _check_positive("train.batch_size", self.batch_size)
        if self.batch_size < 2:
            raise ValueError("train.batch_size must be ≥ 2 (batch statistics need two samples)")
        _check_positive("train.lr", self.lr)
        _check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("train.warmup_epochs", self.warmup_epochs, allow_zero=True)
        _check_positive("train.grad_clip", self.grad_clip, allow_zero=True)
        _check_positive("train.checkpoint_every", self.checkpoint_every, allow_zero=True)
        _check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("train.schedule", self.schedule, SCHEDULES)
        _check_choice("train.loss", self.loss, LOSSES)
        _check_choice("train.metric", self.metric, METRICS)
        _check_choice("train.amp", self.amp, AMP_MODES)


@dataclass
class RunConfig:
    """Everything a training run needs; written to ``RUN_DIR/config.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    enhancers: list[dict[str, Any]] = field(default_factory=list)  # e.g. [{"name": "tfa", "tau1": 0.5}]

    def __post_init__(self) -> None:
        from elta.enhancers import build_enhancers

        build_enhancers(self.enhancers)  # unknown names or settings fail here, not mid-run
        if self.train.cache_features and not self.model.freeze_backbone:
            raise ValueError(
                "train.cache_features needs model.freeze_backbone (features change while it trains)"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> RunConfig:
        """Build from a nested dict; unknown sections or keys are errors, not silent defaults."""
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(sections)
        if unknown:
            raise ValueError(f"{source}: unknown section(s) {sorted(unknown)}; expected {sorted(sections)}")
        enhancers = raw.get("enhancers") or []
        if not isinstance(enhancers, list) or not all(isinstance(e, dict) and "name" in e for e in enhancers):
            raise ValueError(f"{source}: 'enhancers' must be a list of mappings with a 'name'")
        kwargs: dict[str, Any] = {"enhancers": [dict(e) for e in enhancers]}
        for name, section_cls in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)):
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{source}: section '{name}' must be a mapping")
            known = {f.name for f in dataclasses.fields(section_cls)}
            bad = set(values) - known
            if bad:
                raise ValueError(
                    f"{source}: unknown key(s) in '{name}': {sorted(bad)}; known: {sorted(known)}"
                )
            if values.get("score_range") is not None:
                values = {**values, "score_range": tuple(values["score_range"])}
            kwargs[name] = section_cls(**values)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        with path.open(encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping with sections data/model/train/enhancers")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        if raw["data"]["score_range"] is not None:
            raw["data"]["score_range"] = list(raw["data"]["score_range"])
        return raw

    def to_yaml(self, path: str | Path) -> Path:
        from elta.utils import atomic_write_text

        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def override(self, section: str, **values: Any) -> RunConfig:
        """A copy with the non-None ``values`` replaced in ``section`` (re-validated)."""
        current = getattr(self, section)
        changes = {k: v for k, v in values.items() if v is not None}
        return dataclasses.replace(self, **{section: dataclasses.replace(current, **changes)})
