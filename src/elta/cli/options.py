"""Command-line options generated from the config dataclasses, and the shared plumbing of the commands.

A command declares which settings it exposes as ``{section: ALL | (field, ...)}``; each becomes
``--field-name`` with the field's help and choices from its metadata (``--data`` for ``data.data``).
Values are handed to the config as typed, so ``--lr fast`` fails as ``train.lr (--lr): expected a number``.
Only the TFA / FLSA shortcuts and ``--enhancer`` are written by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import typing
from typing import Any

from elta.config import SECTIONS, RunConfig, RuntimeConfig, flag_for

__all__ = [
    "ALL",
    "TRAIN_SETTINGS",
    "DATA_SETTINGS",
    "INFERENCE_RUNTIME",
    "add_config_options",
    "add_enhancer_options",
    "apply_options",
    "given",
    "build_runtime",
    "progress",
]

ALL = "*"
Exposed = dict[str, str | tuple[str, ...]]

# What `elta train` (and ablate, self-train, tune) reads from the command line.
_TRAIN_RUNTIME = ("device", "workers", "amp", "channels_last", "compile")
TRAIN_SETTINGS: Exposed = {"data": ALL, "model": ALL, "train": ALL, "runtime": _TRAIN_RUNTIME}
# Which dataset, and how to read it (data check, data cache, evaluate, calibrate).
_GENERIC_CSV = ("image_column", "mos_column", "split_column", "group_column")
DATA_SETTINGS: Exposed = {
    "data": ("data", "images", "format", "splits", *_GENERIC_CSV, "strict", "score_range")
}
# Where inference runs (evaluate, calibrate, predict, pseudo-label).
INFERENCE_RUNTIME: Exposed = {"runtime": ("device", "batch_size", "workers", "amp")}

_METAVARS = {int: "N", float: "X", str: None}


def _dest(section: str, key: str) -> str:
    return f"{section}.{key}"


def _bare(annotation: Any) -> Any:
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    return options[0] if typing.get_origin(annotation) is not None and len(options) == 1 else annotation


def add_config_options(parser: argparse.ArgumentParser, *exposed: Exposed) -> None:
    """Add one option per exposed config field, grouped by section; values stay unset (None) unless given."""
    for spec in exposed:
        for section, keys in spec.items():
            cls = SECTIONS[section]
            hints = typing.get_type_hints(cls)
            fields = {f.name: f for f in dataclasses.fields(cls)}
            group = parser.add_argument_group(f"{section} settings ({section}.* in a config file)")
            for key in fields if keys == ALL else keys:
                f, kind = fields[key], _bare(hints[key])
                kw: dict[str, Any] = {"dest": _dest(section, key), "default": None}
                kw["help"] = f.metadata["help"]
                if kind is bool:
                    kw["action"] = "store_true"
                elif typing.get_origin(kind) is tuple:
                    kw["nargs"], kw["metavar"] = len(typing.get_args(kind)), ("LOW", "HIGH")
                elif "choices" in f.metadata:
                    kw["choices"] = f.metadata["choices"]
                else:
                    kw["metavar"] = _METAVARS.get(kind) or key.upper()
                group.add_argument(flag_for(key), **kw)


def add_enhancer_options(parser: argparse.ArgumentParser) -> None:
    """The ELTA shortcuts (--tfa, --tfa-tau1, …, --flsa-weight, --flsa-range) and --enhancer NAME:k=v."""
    group = parser.add_argument_group("enhancers (ELTA)")
    group.add_argument("--tfa", action="store_true", default=None, help="tail feature augmentation (mixup)")
    for tau, role, default in (("tau1", "anchor", "0.5"), ("tau2", "partner", "2")):
        what = f"TFA {role} temperature τ{tau[-1]}, in AVA-equivalent score units (default {default})"
        group.add_argument(f"--tfa-{tau}", metavar="X", help=what)
    group.add_argument("--tfa-pairs", metavar="N", help="mixed samples appended per batch (default 1)")
    group.add_argument("--flsa-weight", metavar="X", help="feature-label similarity alignment weight w")
    group.add_argument(
        "--flsa-range", choices=("batch", "dataset"), help="FLSA label range R (default batch)"
    )
    any_one = "any registered enhancer with settings, e.g. tfa:tau1=0.3 (repeatable)"
    group.add_argument("--enhancer", action="append", metavar="NAME[:k=v,...]", help=any_one)


def _enhancers_from_args(current: list[dict], args: argparse.Namespace) -> list[dict]:
    """The config's enhancer list with the command line's additions and changes, checked and typed so that a
    bad setting fails before any work."""
    from elta.enhancers import check_enhancers, parse_enhancer

    specs = {e["name"]: dict(e) for e in current}
    for name, keys in (("tfa", ("tau1", "tau2", "pairs")), ("flsa", ("weight", "range"))):
        values = {k: getattr(args, f"{name}_{k}") for k in keys}
        values = {k: v for k, v in values.items() if v is not None}
        if values or (name == "tfa" and args.tfa):
            specs[name] = {**specs.get(name, {"name": name}), **values}
    for text in args.enhancer or []:
        spec = parse_enhancer(text)
        specs[spec["name"]] = {**specs.get(spec["name"], {}), **spec}
    return check_enhancers(list(specs.values()))


def given(args: argparse.Namespace, section: str, key: str) -> Any:
    """The command-line value of ``section.key``; None when the option was not given (or not offered)."""
    return getattr(args, _dest(section, key), None)


def apply_options(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """``cfg`` with the command line's values over the config file's, section by section (re-checked)."""
    for section, cls in SECTIONS.items():
        values = {f.name: given(args, section, f.name) for f in dataclasses.fields(cls)}
        cfg = cfg.override(section, **values)
    if hasattr(args, "enhancer"):  # a command with the enhancer options: they are checked too
        cfg = dataclasses.replace(cfg, enhancers=_enhancers_from_args(cfg.enhancers, args))
    return cfg


def build_runtime(runtime: RuntimeConfig):
    """The engine's :class:`~elta.engine.runtime.Runtime` from the ``runtime`` section, with progress bars on a
    terminal."""
    from elta.engine.runtime import Runtime

    return Runtime.from_config(runtime, progress=progress())


def progress() -> bool:
    """Whether a command reports progress (a bar on a terminal, else a log line every half minute): when the
    console shows INFO, i.e. not with -q."""
    consoles = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    return any(h.level <= logging.INFO for h in consoles)
