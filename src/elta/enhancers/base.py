"""The enhancer interface: plug-ins that see a training step's features, targets and predictions.

An enhancer receives the step's :class:`StepState` and returns it, possibly with rows appended (feature
augmentation), weights changed (re-weighting) and named loss terms added. Enhancers run in ``order`` after
the backbone (and neck) and before the head, so every loss covers the augmented batch; ``after_head`` sees
the predictions too. State kept in buffers is saved in checkpoints. Enhancers are registered by name and
built from plain dicts (``{"name": "tfa", "tau1": 0.5}``), as a run's config stores them.
"""

from __future__ import annotations

import dataclasses
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from elta.config import coerce_value
from elta.errors import ConfigError

__all__ = [
    "StepState",
    "TrainingContext",
    "Enhancer",
    "register_enhancer",
    "build_enhancers",
    "check_enhancers",
    "ENHANCERS",
    "parse_enhancer",
    "scalar_head_users",
]

ENHANCERS: dict[str, type[Enhancer]] = {}


def _same_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class StepState:
    """One training step's tensors between the feature extractor and the head.

    features [N, D]; targets [N, K] distributions or [N] scores in [0, 1] (scalar head); scores [N] MOS on
    the dataset's scale; weights [N] per-sample loss weights. ``losses`` holds named extra terms that
    are already weighted: the total loss is the main loss plus their sum.
    """

    features: torch.Tensor
    targets: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor
    score_range: tuple[float, float]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    indices: torch.Tensor | None = None  # [B] training-row indices of the batch's real samples
    epoch: int = 0  # 0-based
    replace_main: bool = False  # set by an enhancer whose loss replaces the main loss (e.g. BMC)
    # rows of every training process concatenated (differentiable; the identity in a single process):
    # a loss over the global batch, which every process computes alike, uses gather(features)
    gather: Callable[[torch.Tensor], torch.Tensor] = _same_rows


@dataclass
class TrainingContext:
    """What enhancers may know about the training set before training (``Enhancer.setup``)."""

    scores: torch.Tensor  # [N] training MOS on the dataset's scale, in training-row order
    groups: list[str]  # [N] training groups ("" = none)
    score_range: tuple[float, float]
    num_bins: int  # 0 for a scalar head
    loss: str  # emd | mse | l1
    feature_dim: int
    epochs: int


class Enhancer(nn.Module):
    """Base class. Subclasses set ``name`` and ``order`` and implement the hooks they need."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100  # re-weighting < 10 <= augmentation < 50 <= regularisers
    needs_scalar_head: ClassVar[bool] = False  # True: `--loss auto` trains the scalar head (mse)

    def __init__(self, settings) -> None:
        """``settings``: an instance of the subclass's nested ``Settings`` dataclass."""
        super().__init__()
        self.cfg = settings
        self._settings = dataclasses.asdict(settings)

    def setup(self, context: TrainingContext) -> None:
        """Called once before training (and before a resume loads the saved state)."""

    def forward(self, state: StepState) -> StepState:
        """Before the head: may change features, targets, scores, weights (rows appended at the end)."""
        return state

    def after_head(self, state: StepState, out) -> StepState:
        """After the head on ``state.features``: ``out`` is the :class:`~elta.models.ModelOutput`."""
        return state

    def on_epoch_end(self, epoch: int) -> None:
        """Called after each epoch's last training step (before validation)."""

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups of the enhancer's own learnable parameters (none by default)."""
        return []

    def sample_weights(self, context: TrainingContext) -> torch.Tensor | None:
        """Per-row sampling weights [N] for a weighted sampler, or None for plain shuffling."""
        return None

    def settings(self) -> dict[str, Any]:
        """The enhancer's settings as a plain dict (``name`` first), as stored in a run's config."""
        return {"name": self.name, **self._settings}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._settings.items())


def register_enhancer(cls: type[Enhancer]) -> type[Enhancer]:
    """Class decorator: make ``cls`` available by ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    ENHANCERS[cls.name] = cls
    return cls


def _coerce_settings(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` read as the types of enhancer ``name``'s ``Settings`` (``"1e-5"`` -> 1e-5 for a float)."""
    if name not in ENHANCERS:
        raise ConfigError(f"unknown enhancer {name!r}; known: {', '.join(sorted(ENHANCERS))}")
    settings_cls = ENHANCERS[name].Settings
    hints = typing.get_type_hints(settings_cls)
    known = {f.name for f in dataclasses.fields(settings_cls)}
    bad = set(values) - known
    if bad:
        raise ConfigError(f"enhancer {name}: unknown setting(s) {sorted(bad)}; known: {sorted(known)}")
    return {k: coerce_value(v, hints[k], f"enhancer {name}, setting {k}") for k, v in values.items()}


def check_enhancers(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The specs with their settings coerced to each enhancer's types, checked as :func:`build_enhancers`
    would (unknown names or settings, values out of range, an enhancer given twice): a
    :class:`~elta.errors.ConfigError` before any work starts rather than mid-run."""
    checked = []
    for spec in specs:
        values = dict(spec)
        name = values.pop("name", None)
        values = _coerce_settings(name, values)
        try:
            ENHANCERS[name].Settings(**values)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc)) from exc
        checked.append({"name": name, **values})
    duplicated = {n for n, count in Counter(spec["name"] for spec in checked).items() if count > 1}
    if duplicated:
        raise ConfigError(f"enhancer(s) given twice: {sorted(duplicated)}")
    return checked


def build_enhancers(specs: list[dict[str, Any]]) -> nn.ModuleList:
    """Instantiate enhancers from ``[{"name": ..., setting: value, ...}, ...]``, sorted by ``order``.

    Unknown names and unknown settings are errors that list what is known (see :func:`check_enhancers`).
    """
    built = []
    for spec in check_enhancers(specs):
        values = dict(spec)
        cls = ENHANCERS[values.pop("name")]
        built.append(cls(cls.Settings(**values)))
    return nn.ModuleList(sorted(built, key=lambda e: e.order))


def parse_enhancer(text: str) -> dict[str, Any]:
    """``"tfa:tau1=0.3,pairs=2"`` -> ``{"name": "tfa", "tau1": 0.3, "pairs": 2}``.

    Values are read as the enhancer's settings are typed (``tau1=1e-5`` is the float 1e-5); an unknown
    setting or a value of the wrong type is a one-line :class:`~elta.errors.ConfigError`. A name that is
    not a registered enhancer (an ablation token such as ``apds:beta=1.2``) keeps YAML-read values; as an
    enhancer it is refused by :func:`check_enhancers`.
    """
    import yaml

    name, _, rest = text.partition(":")
    name = name.strip()
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--enhancer {text}: expected key=value, got {item!r}")
        values[key.strip()] = value.strip()
    if name not in ENHANCERS:
        return {"name": name, **{k: yaml.safe_load(v) for k, v in values.items()}}
    return {"name": name, **_coerce_settings(name, values)}


def scalar_head_users(specs: list[dict[str, Any]]) -> list[str]:
    """The names among enhancer ``specs`` (``{"name": ...}``; unknown names ignored) that need a scalar head."""
    return [s["name"] for s in specs if s.get("name") in ENHANCERS and ENHANCERS[s["name"]].needs_scalar_head]
