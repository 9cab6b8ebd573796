"""Run configuration: nested dataclasses, checked on creation, loadable from and saved as YAML.

Every field carries its help text (and, for enum-like settings, its ``choices``) in ``field(metadata=...)``;
the command line is generated from them (:mod:`elta.cli.options`). Values are coerced to the field's
annotation when a section is built, so YAML's ``lr: 1e-5`` (a string to PyYAML) and ``--lr 1e-5`` both
become the float 1e-5; a value that cannot be read is a :class:`~elta.errors.ConfigError` naming
``section.key`` and its flag. This module imports neither torch nor the enhancers.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from elta.errors import ConfigError
from elta.utils import atomic_write_text

__all__ = [
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "RuntimeConfig",
    "RunConfig",
    "SECTIONS",
    "PAPER_BACKBONE",
    "RECIPES",
    "coerce_value",
    "flag_for",
    "setting_name",
]

PAPER_BACKBONE = "swinv2_base_window8_256"
LOSSES = ("auto", "emd", "mse", "l1")
METRICS = ("srcc", "plcc", "acc")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
FORMATS = ("auto", "ava", "elta-csv", "csv", "koniq", "para", "aadb")
AMP_MODES = ("auto", "bf16", "fp16", "off")
LOG_TARGETS = ("none", "tensorboard")

# Optimisation recipes: what a run's unset (None) train settings become. `paper` is the paper's (SwinV2-B,
# batch 48, 20 epochs); `finetune` is the one measured best for short convolutional fine-tunes
# (docs/benchmarks.md, "The default recipe"). `auto` picks by backbone family, see TrainConfig.resolved.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": dict(lr=1e-5, optimizer="adam", weight_decay=0.0, schedule="constant", warmup_epochs=0.0,
                  grad_clip=0.0, backbone_lr_scale=1.0, layer_decay=1.0, ema=0.0),
    "finetune": dict(lr=1e-3, optimizer="adamw", weight_decay=1e-4, schedule="cosine", warmup_epochs=0.5,
                     grad_clip=5.0, backbone_lr_scale=0.3, layer_decay=1.0, ema=0.99),
}  # fmt: skip
# timm families trained with the paper's transformer recipe under `auto`
TRANSFORMER_FAMILIES = ("swin", "vit", "deit", "beit", "eva", "cait", "xcit", "pvt", "twins", "maxvit", "coat",
                        "levit", "crossvit", "mvit", "flexivit", "test_vit")  # fmt: skip


# Keys that older configs kept in data/train and that now live in runtime. Saved run folders
# (RUN_DIR/config.yaml, read by --resume) and `elta tune` base configs still carry them there.
LEGACY_RUNTIME_KEYS = {"train": ("device", "amp", "channels_last", "compile"), "data": ("workers",)}

# A train section that sets all of these but no recipe was saved before recipes existed (RUN_DIR/config.yaml
# lists every setting): it gets the paper recipe, whose backbone_lr_scale, layer_decay and ema it was run with.
PRE_RECIPE_KEYS = ("lr", "optimizer", "weight_decay", "schedule", "warmup_epochs", "grad_clip")

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NULL = ("null", "none", "~", "")
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def flag_for(key: str) -> str:
    """The command-line flag of a setting: ``val_fraction`` -> ``--val-fraction``."""
    return "--" + key.replace("_", "-")


def setting_name(section: str, key: str) -> str:
    """How errors name a setting: ``train.lr (--lr)``."""
    return f"{section}.{key} ({flag_for(key)})"


def coerce_value(value: Any, annotation: Any, where: str) -> Any:
    """``value`` as the type ``annotation`` describes (bool, int, float, str, ``X | None``, ``tuple[...]``).

    Strings are read as numbers or booleans where the annotation asks for one; an int is accepted for a
    float, an integral float for an int. Anything else raises :class:`ConfigError` naming ``where``.
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (
            str not in options and isinstance(value, str) and value.strip().lower() in _NULL
        ):
            return None
        if len(options) != 1:
            raise TypeError(f"{where}: unsupported annotation {annotation}")
        annotation, origin = options[0], typing.get_origin(options[0])

    def fail() -> typing.NoReturn:
        expected = _EXPECTED.get(annotation, str(annotation))
        if origin is tuple:
            expected = f"{len(typing.get_args(annotation))} numbers"
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")

    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        fail()
    if annotation in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())  # also "1e3" for an int
            except ValueError:
                fail()
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            fail()
        if annotation is float:
            return float(number)
        if isinstance(number, float) and not number.is_integer():
            fail()
        return int(number)
    if annotation is str:
        if isinstance(value, str):
            return value
        fail()
    if origin is tuple:
        items = typing.get_args(annotation)
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            fail()
        return tuple(coerce_value(v, t, where) for v, t in zip(value, items, strict=True))
    return value


def setting(default: Any = None, help: str = "", *, choices: tuple | None = None) -> Any:
    """A config field with its help text (and choices) in the field's metadata."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    return field(default=default, metadata=metadata)


class _Section:
    """Shared checks of the config sections: coercion to the annotations, then ``choices``."""

    section: typing.ClassVar[str] = ""

    def _coerce(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            where = setting_name(self.section, f.name)
            value = coerce_value(getattr(self, f.name), hints[f.name], where)
            choices = f.metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}; got {value!r}")
            setattr(self, f.name, value)

    def _reject(self, key: str, bad: bool, rule: str) -> None:
        """Raise ``section.key (--flag) must be RULE; got VALUE`` when ``bad``."""
        if bad:
            raise ConfigError(f"{setting_name(self.section, key)} must be {rule}; got {getattr(self, key)!r}")

    def _positive(self, *keys: str, allow_zero: bool = False) -> None:
        for key in keys:
            value = getattr(self, key)
            negative = value is not None and (value < 0 or (value == 0 and not allow_zero))
            self._reject(key, negative, "≥ 0" if allow_zero else "> 0")


@dataclass
class DataConfig(_Section):
    """Where the annotations and images are, and how to read them."""

    section: typing.ClassVar[str] = "data"

    data: str | None = setting(
        None, "annotation file or dataset folder (AVA.txt, ELTA CSV folder, KonIQ, PARA, AADB, CSV)"
    )
    images: str | None = setting(
        None, "image root folder (default: the format's usual folder next to --data)"
    )
    format: str = setting(
        "auto", "annotation format (default auto: recognised from the files)", choices=FORMATS
    )
    splits: str | None = setting(None, "folder with train.txt / val.txt / test.txt split lists (AVA)")
    val_fraction: float = setting(0.1, "fraction of train held out when the dataset has no val split")
    strict: bool = setting(False, "any bad row is an error instead of a reported skip")
    image_column: str | None = setting(None, "generic CSV: image column name (default: common names)")
    mos_column: str | None = setting(None, "generic CSV: MOS column name")
    split_column: str | None = setting(None, "generic CSV: split column name")
    group_column: str | None = setting(None, "generic CSV: group / tag column name")
    score_range: tuple[float, float] | None = setting(None, "generic CSV: the rating scale's ends (LOW HIGH)")
    pseudo_labels: str | None = setting(
        None, "pseudo-label CSV (elta pseudo-label) added to the training rows"
    )
    pseudo_weight: float = setting(
        1.0, "loss weight of pseudo-labelled rows (a row's own weight column wins; default 1)"
    )

    def __post_init__(self) -> None:
        self._coerce()
        self._reject("val_fraction", not 0.0 < self.val_fraction < 1.0, "in (0, 1)")
        if self.score_range is not None and not self.score_range[0] < self.score_range[1]:
            where = setting_name("data", "score_range")
            raise ConfigError(f"{where} must be [low, high] with low < high; got {list(self.score_range)}")
        self._positive("pseudo_weight", allow_zero=True)


@dataclass
class ModelConfig(_Section):
    """Backbone, input geometry and head."""

    section: typing.ClassVar[str] = "model"

    backbone: str = setting(PAPER_BACKBONE, f"timm model name (default {PAPER_BACKBONE}, the paper's)")
    weights: str = setting("imagenet", "imagenet | none | PATH to a backbone weights file")
    image_size: int | None = setting(None, "input size in px (default: the backbone's pretrained size)")
    resize: int | None = setting(None, "square resize before the random crop (default image_size·300/256)")
    neck_dim: int = setting(0, "> 0 adds a Linear + ReLU neck of this width before the head")
    dropout: float = setting(0.75, "dropout before the scalar head (default 0.75)")
    init_from: str | None = setting(None, "start from this checkpoint (elta's or the original release's)")
    freeze_backbone: bool = setting(False, "train only the neck and head (regressor retraining)")
    reset_head: bool = setting(False, "re-initialise the head after --init-from")

    def __post_init__(self) -> None:
        self._coerce()
        self._positive("image_size", "resize")
        if self.resize is not None and self.image_size is not None and self.resize < self.image_size:
            raise ConfigError(
                f"{setting_name('model', 'resize')} ({self.resize}) must be ≥ model.image_size "
                f"({self.image_size})"
            )
        self._positive("neck_dim", allow_zero=True)
        self._reject("dropout", not 0.0 <= self.dropout < 1.0, "in [0, 1)")


@dataclass
class TrainConfig(_Section):
    """Optimisation. Settings left unset come from the recipe: ``auto`` gives transformers the paper's (Adam,
    lr 1e-5, constant) and other backbones ``finetune`` (see :data:`RECIPES`)."""

    section: typing.ClassVar[str] = "train"

    epochs: int = setting(20, "epochs (default 20)")
    batch_size: int = setting(48, "training batch size (default 48)")
    recipe: str = setting(
        "auto",
        "defaults of the optimisation settings below: paper (Adam 1e-5, constant), finetune (AdamW, head 1e-3, "
        "backbone 0.3×, warm-up + cosine, clipping, weight EMA), auto = paper for transformers, finetune otherwise",
        choices=("auto", *RECIPES),
    )
    lr: float | None = setting(None, "learning rate of the neck and head (default: the recipe's)")
    backbone_lr_scale: float | None = setting(None, "learning rate of the backbone = lr × this (recipe's)")
    layer_decay: float | None = setting(
        None, "< 1: each earlier backbone layer's lr × this (timm's layer groups; transformers)"
    )
    optimizer: str | None = setting(None, "optimizer (default: the recipe's)", choices=OPTIMIZERS)
    weight_decay: float | None = setting(None, "weight decay (default: the recipe's)")
    schedule: str | None = setting(None, "learning-rate schedule (default: the recipe's)", choices=SCHEDULES)
    warmup_epochs: float | None = setting(None, "linear warm-up length in epochs (default: the recipe's)")
    grad_clip: float | None = setting(None, "clip the gradient norm to this value (0 = off; recipe's)")
    ema: float | None = setting(
        None, "> 0: validate and keep an exponential moving average of the weights with this decay (recipe's)"
    )
    loss: str = setting(
        "auto", "loss: auto = emd when the dataset has vote distributions, else mse", choices=LOSSES
    )
    metric: str = setting("srcc", "validation metric that picks best.pt (default srcc)", choices=METRICS)
    seed: int = setting(0, "random seed (default 0)")
    checkpoint_every: int = setting(0, "also write last.pt every N steps in an epoch (0 = at epoch ends)")
    cache_features: bool = setting(False, "frozen backbone: compute pooled features once, reuse them")
    feature_cache: str | None = setting(None, "feature cache file (default RUN_DIR/feature_cache.pt)")
    log_to: str = setting(
        "none",
        "also log the per-epoch scalars of metrics.csv to TensorBoard (RUN_DIR/tensorboard; needs tensorboard)",
        choices=LOG_TARGETS,
    )

    def __post_init__(self) -> None:
        self._coerce()
        self._positive("epochs", "batch_size")
        self._reject("batch_size", self.batch_size < 2, "≥ 2 (batch statistics need two samples)")
        self._positive("lr", "backbone_lr_scale", "layer_decay")
        self._positive("weight_decay", "warmup_epochs", "grad_clip", "checkpoint_every", allow_zero=True)
        self._reject("layer_decay", self.layer_decay is not None and self.layer_decay > 1.0, "in (0, 1]")
        self._reject("ema", self.ema is not None and not 0.0 <= self.ema < 1.0, "in [0, 1)")

    def resolved(self, backbone: str) -> TrainConfig:
        """A copy with the unset settings filled from the recipe; ``auto`` is ``paper`` for a transformer
        ``backbone``, ``finetune`` else."""
        name = self.recipe
        if name == "auto":
            name = "paper" if backbone.lower().startswith(TRANSFORMER_FAMILIES) else "finetune"
        unset = {k: v for k, v in RECIPES[name].items() if getattr(self, k) is None}
        return dataclasses.replace(self, recipe=name, **unset)


@dataclass
class RuntimeConfig(_Section):
    """Where and how a command runs: device, data-loading processes, inference batch, precision."""

    section: typing.ClassVar[str] = "runtime"

    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps (default auto)")
    workers: int | None = setting(None, "data-loading processes (default: from the CPU count)")
    batch_size: int = setting(32, "inference batch size (default 32; training uses train.batch_size)")
    amp: str = setting(
        "auto",
        "mixed precision of the model forward: auto = bf16 on CUDA GPUs that support it, else off",
        choices=AMP_MODES,
    )
    channels_last: bool = setting(False, "model and images in channels-last memory format")
    compile: bool = setting(
        False, "torch.compile the backbone (slow first steps; needs a C++ compiler on CPU)"
    )

    def __post_init__(self) -> None:
        self._coerce()
        self._positive("workers", allow_zero=True)
        self._positive("batch_size")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "runtime": RuntimeConfig}


@dataclass
class RunConfig:
    """Everything a run needs; written to ``RUN_DIR/config.yaml``.

    ``enhancers`` holds plain specs (``[{"name": "tfa", "tau1": 0.5}]``); their names and settings are
    checked by :func:`elta.enhancers.check_enhancers` where a run starts, not here.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    enhancers: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.enhancers, list) or not all(
            isinstance(e, dict) and "name" in e for e in self.enhancers
        ):
            raise ConfigError("enhancers must be a list of mappings with a 'name'")
        if self.train.cache_features and not self.model.freeze_backbone:
            raise ConfigError(
                "train.cache_features needs model.freeze_backbone (features change while it trains)"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> RunConfig:
        """Build from a nested dict; unknown sections or keys are errors, not silent defaults."""
        known_sections = [*SECTIONS, "enhancers"]
        unknown = set(raw) - set(known_sections)
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; expected {known_sections}")
        sections = {name: raw.get(name) or {} for name in SECTIONS}
        for name, values in sections.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section '{name}' must be a mapping")
            sections[name] = dict(values)
        for name, keys in LEGACY_RUNTIME_KEYS.items():  # older configs: see LEGACY_RUNTIME_KEYS
            for key in keys:
                if key in sections[name]:
                    sections["runtime"].setdefault(key, sections[name].pop(key))
        if "recipe" not in sections["train"] and all(k in sections["train"] for k in PRE_RECIPE_KEYS):
            sections["train"]["recipe"] = "paper"
        kwargs: dict[str, Any] = {}
        for name, section_cls in SECTIONS.items():
            known = {f.name for f in dataclasses.fields(section_cls)}
            bad = set(sections[name]) - known
            if bad:
                raise ConfigError(
                    f"{source}: unknown key(s) in '{name}': {sorted(bad)}; known: {sorted(known)}"
                )
            kwargs[name] = section_cls(**sections[name])
        enhancers = raw.get("enhancers") or []
        if not isinstance(enhancers, list) or not all(isinstance(e, dict) and "name" in e for e in enhancers):
            raise ConfigError(f"{source}: 'enhancers' must be a list of mappings with a 'name'")
        return cls(**kwargs, enhancers=[dict(e) for e in enhancers])

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        with path.open(encoding="utf-8") as fh:
            try:
                raw = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}, enhancers")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        if raw["data"]["score_range"] is not None:
            raw["data"]["score_range"] = list(raw["data"]["score_range"])
        return raw

    def yaml_text(self) -> str:
        """The resolved config as YAML (sections data, model, train, runtime, enhancers)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_yaml(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.yaml_text())

    def resolved(self, backbone: str | None = None) -> RunConfig:
        """A copy whose train settings are all set: those left unset come from the recipe of ``backbone``
        (default model.backbone; a run from --init-from trains the checkpoint's backbone)."""
        return dataclasses.replace(self, train=self.train.resolved(backbone or self.model.backbone))

    def override(self, section: str, **values: Any) -> RunConfig:
        """A copy with the non-None ``values`` replaced in ``section`` (re-checked)."""
        current = getattr(self, section)
        changes = {k: v for k, v in values.items() if v is not None}
        return dataclasses.replace(self, **{section: dataclasses.replace(current, **changes)})
