"""Running ``elta train`` as an NNI trial, as the original ELTA release recommends for tuning.

Under NNI, the trial takes its settings from ``nni.get_next_parameter()`` (dotted setting names such as
``train.lr`` and ``enhancers.tfa.tau1``, or the original's ``lr``, ``batch_size``, ``simloss_weight``,
``tau_1``, ``tau_2``), reports the validation metric after every epoch and the run's best at the end.
``nni`` is imported only when NNI started the process.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

from elta import launch
from elta.config import RunConfig
from elta.errors import UnavailableError

__all__ = ["ORIGINAL_NAMES", "under_nni", "nni_wrap"]

log = logging.getLogger(__name__)

# The original release's parameter names, for search spaces carried over from it.
ORIGINAL_NAMES = {
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "simloss_weight": "enhancers.flsa.weight",
    "tau_1": "enhancers.tfa.tau1",
    "tau_2": "enhancers.tfa.tau2",
}


def under_nni() -> bool:
    """True in a process NNI started as a trial: NNI v3 sets ``NNI_TRIAL_COMMAND_CHANNEL``, every version
    sets ``NNI_PLATFORM`` (which NNI's own tests set to ``unittest``, meaning standalone)."""
    platform = os.environ.get("NNI_PLATFORM", "")
    return bool(os.environ.get("NNI_TRIAL_COMMAND_CHANNEL")) or platform not in ("", "unittest")


def _ignore(summary: dict) -> None:
    """Outside NNI there is nothing to report."""


def nni_wrap(cfg: RunConfig) -> tuple[RunConfig, Callable[[int, dict], None] | None, Callable[[dict], None]]:
    """``(cfg, on_epoch, final)`` for ``train``: under NNI the config with the tuner's parameters applied
    (original names translated), a per-epoch reporter of ``val_<train.metric>`` and a reporter of the run's
    best (``train``'s summary) as the trial's final result; elsewhere ``(cfg, None, a no-op)``."""
    if not under_nni():
        return cfg, None, _ignore
    try:
        import nni
    except ImportError as exc:
        raise UnavailableError(
            f"running as an NNI trial (NNI_PLATFORM={os.environ.get('NNI_PLATFORM')!r}) but the nni package "
            "is not importable in this environment: pip install nni"
        ) from exc
    from elta.workflows.tune import apply_params

    raw = nni.get_next_parameter() or {}
    params = {ORIGINAL_NAMES.get(name, name): value for name, value in raw.items()}
    if params:
        log.info("NNI trial %s: %s", os.environ.get("NNI_TRIAL_JOB_ID", "?"), params)
        cfg = apply_params(cfg, params)
    if launch.rank() > 0:  # a distributed trial reports once, from rank 0
        return cfg, None, _ignore
    metric = cfg.train.metric

    def on_epoch(epoch: int, row: dict) -> None:
        value = float(row[f"val_{metric}"])
        if math.isfinite(value):  # NNI's manager cannot parse NaN
            nni.report_intermediate_result(value)

    def final(summary: dict) -> None:
        value = float(summary["best_metric"])
        if math.isfinite(value):
            nni.report_final_result(value)
        else:
            log.warning("no finite validation %s: no final result reported to NNI", summary.get("metric"))

    return cfg, on_epoch, final
