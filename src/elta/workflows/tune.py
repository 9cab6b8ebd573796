"""Hyper-parameter search over run settings with Optuna: every trial is an ordinary training run.

A search space maps dotted setting names (``train.lr``, ``model.neck_dim``, ``enhancers.tfa.tau1``) to
``{choices: [...]}`` or ``{low, high[, log][, step]}``. The study lives in a database (``DIR/study.db`` by
default), so rerunning the same command after a crash or a kill continues the search.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import socket
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from elta.config import SECTIONS, RunConfig, coerce_value
from elta.errors import ConfigError, RunExistsError, UnavailableError
from elta.utils import atomic_write_text

__all__ = [
    "DEFAULT_SPACE",
    "Heartbeat",
    "Param",
    "apply_params",
    "database_url",
    "format_trials",
    "load_search",
    "parse_space",
    "run_tune",
]

log = logging.getLogger(__name__)

# The original ELTA release's NNI search (TPE, 8 trials), with our setting names.
DEFAULT_SPACE: dict[str, dict[str, list]] = {
    "train.batch_size": {"choices": [16, 48]},
    "train.lr": {"choices": [1e-5, 1e-4]},
    "enhancers.flsa.weight": {"choices": [0.01, 0.1, 0.2, 0.5, 1.0, 5.0, 10.0, 100.0]},
    "enhancers.tfa.tau1": {"choices": [0.05, 0.1, 0.2, 0.3, 0.4, 0.5]},
    "enhancers.tfa.tau2": {"choices": [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 10.0]},
}
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")
# Settings that do not change a trial's result: a resumed search may differ in them.
_VOLATILE = {"runtime.device", "runtime.workers", "runtime.batch_size", "train.feature_cache", "train.log_to"}


# ---------------------------------------------------------------------------------------- search space


def _setting_type(name: str, source: str) -> Any:
    """The type of the setting ``name`` (float, int | None, ...); unknown names are errors."""
    parts = name.split(".")
    if parts[0] in SECTIONS and len(parts) == 2:
        owner, listed = SECTIONS[parts[0]], f"{parts[0]} keys"
    elif parts[0] == "enhancers" and len(parts) == 3:
        from elta.enhancers import ENHANCERS

        if parts[1] not in ENHANCERS:
            raise ConfigError(
                f"{source}: unknown enhancer in {name!r}; known: {', '.join(sorted(ENHANCERS))}"
            )
        owner, listed = ENHANCERS[parts[1]].Settings, f"{parts[1]} settings"
    else:
        raise ConfigError(
            f"{source}: {name!r} is not a setting name; use data.KEY, model.KEY, train.KEY or "
            "enhancers.NAME.SETTING (e.g. train.lr, enhancers.tfa.tau1)"
        )
    hints = typing.get_type_hints(owner)
    if parts[-1] not in {f.name for f in dataclasses.fields(owner)}:
        raise ConfigError(f"{source}: unknown setting {name!r}; {listed}: {', '.join(sorted(hints))}")
    return hints[parts[-1]]


@dataclass(frozen=True)
class Param:
    """One searched setting: a list of choices, or a numeric range (integer when the setting is)."""

    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    integer: bool = False

    def suggest(self, trial) -> Any:
        """This setting's value for an Optuna ``trial``."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


def _parse_param(name: str, spec: Any, source: str) -> Param:
    where = f"{source}: space.{name}"
    kind = _setting_type(name, source)
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping: {{choices: [...]}} or {{low: A, high: B}}")
    unknown = set(spec) - {"choices", "low", "high", "step", "log"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; use choices, or low/high/step/log")
    if "choices" in spec:
        if len(spec) > 1:
            raise ConfigError(f"{where}: give either choices or low/high, not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list")
        bad = [v for v in choices if v is not None and not isinstance(v, (bool, int, float, str))]
        if bad:
            raise ConfigError(f"{where}: choices must be numbers, strings, booleans or null; got {bad[0]!r}")
        return Param(name, choices=tuple(v if v is None else coerce_value(v, kind, where) for v in choices))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: a range needs low and high (or give choices: [...])")
    if kind not in (int, float, int | None, float | None):
        raise ConfigError(f"{where}: {name} is not a numeric setting; give choices: [...]")
    integer = kind in (int, int | None)
    bounds = (spec["low"], spec["high"], spec.get("step"))
    try:  # the setting's own type reads the bounds (YAML reads 1e-5 as a string)
        low, high, step = (
            v if v is None else coerce_value(v, int if integer else float, where) for v in bounds
        )
    except ConfigError as exc:
        if integer:
            raise ConfigError(
                f"{where}: {name} is an integer setting; give integer low, high and step"
            ) from exc
        raise
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be < high ({high})")
    log_scale = bool(spec.get("log", False))
    if log_scale and (step is not None or low <= 0):
        raise ConfigError(f"{where}: a log range needs low > 0 and no step")
    return Param(name, low=low, high=high, step=step, log=log_scale, integer=integer)


def parse_space(space: dict[str, Any], source: str = "search space") -> dict[str, Param]:
    """Check a search space (setting name -> spec) and return its parameters by name."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{source}: the space must be a non-empty mapping of setting names to specs")
    return {name: _parse_param(name, spec, source) for name, spec in space.items()}


def apply_params(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """A copy of ``base`` with dotted settings replaced; ``enhancers.NAME.X`` adds NAME when absent."""
    raw = base.to_dict()
    for name, value in params.items():
        _setting_type(name, "parameters")
        parts = name.split(".")
        if parts[0] == "enhancers":
            spec = next((e for e in raw["enhancers"] if e["name"] == parts[1]), None)
            if spec is None:
                spec = {"name": parts[1]}
                raw["enhancers"].append(spec)
            spec[parts[2]] = value
        else:
            raw[parts[0]][parts[1]] = value
    from elta.enhancers import check_enhancers

    cfg = RunConfig.from_dict(raw, source="parameters")
    return dataclasses.replace(cfg, enhancers=check_enhancers(cfg.enhancers))


def load_search(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a search file: ``base`` (a RunConfig mapping, or a path to a RunConfig YAML relative to the
    file) and ``space`` (default: :data:`DEFAULT_SPACE`). Returns ``(base_dict, space)``, checked."""
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict) or set(raw) - {"base", "space"}:
        extra = sorted(set(raw) - {"base", "space"}) if isinstance(raw, dict) else raw
        raise ConfigError(f"{path}: expected the sections base and space; got {extra}")
    base = raw.get("base") or {}
    if isinstance(base, str):
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"{path}: base config {base_path} does not exist")
        with base_path.open(encoding="utf-8") as fh:
            base = yaml.safe_load(fh) or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: base must be a mapping (data/model/train/enhancers) or a YAML path")
    space = raw.get("space")
    if space is None:
        return base, {k: dict(v) for k, v in DEFAULT_SPACE.items()}
    params = parse_space(space, source=str(path))  # the values as numbers, read as the settings' types
    return base, {name: {k: _plain(getattr(params[name], k)) for k in spec} for name, spec in space.items()}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------------------------- study


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold ``out/tune.lock`` while searching: trials left RUNNING in the study are then known dead."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one process per folder is the user's promise
        yield
        return
    with (out / "tune.lock").open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise UnavailableError(
                f"{out}: another elta tune is running on this folder; wait for it or use another --out"
            ) from exc
        yield


@dataclass(frozen=True)
class Heartbeat:
    """How a shared study tells a dead worker's trial: a running trial records a heartbeat every
    ``interval`` seconds; one silent for ``grace`` seconds is failed and retried once by another worker."""

    interval: int = 60
    grace: int = 300

    def __post_init__(self) -> None:
        if not 0 < self.interval < self.grace:
            raise ConfigError(
                f"heartbeat: need 0 < interval < grace; got interval {self.interval} s, grace {self.grace} s"
            )


def database_url(url: str) -> str:
    """``url`` with a driver named: a bare ``postgresql://`` means psycopg 3 (``pip install "elta[postgres]"``),
    whatever SQLAlchemy's default for that scheme is."""
    return "postgresql+psycopg://" + url[len("postgresql://") :] if url.startswith("postgresql://") else url


def _storage(optuna, out: Path, url: str | None, heartbeat: Heartbeat):
    if url is None:
        return f"sqlite:///{(out / 'study.db').resolve()}"
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # a dead worker's trial is retried once (the callback was renamed in Optuna 4.9)
                storages = optuna.storages
                if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
                    retry = {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(1)}
                else:
                    retry = {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=1)}
                return storages.RDBStorage(
                    database_url(url),
                    heartbeat_interval=heartbeat.interval,
                    grace_period=heartbeat.grace,
                    **retry,
                )
        except ImportError as exc:  # SQLAlchemy found no driver for the URL's database
            raise UnavailableError(
                f"--storage {_safe(url)}: no database driver ({exc.name or exc}); for PostgreSQL: "
                'pip install "elta[postgres]" (psycopg 3)'
            ) from exc
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers started together race to create the schema: the loser finds it made, on a retry.
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
        except sqlalchemy.exc.SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise UnavailableError(
                f"--storage {_safe(url)}: cannot open the study database: {reason}"
            ) from exc


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _sampler(optuna, name: str, params: dict[str, Param], seed: int, trials: int):
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 3)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler(_grid(params), seed=seed)


def _grid(params: dict[str, Param]) -> dict[str, list]:
    ranges = [p.name for p in params.values() if p.choices is None]
    if ranges:
        raise ConfigError(
            f"--sampler grid needs every setting as {{choices: [...]}}; {', '.join(ranges)} "
            "is a range (list its values, or use --sampler tpe)"
        )
    return {p.name: list(p.choices) for p in params.values()}


def _flat(raw: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _search_record(base: RunConfig, params: dict[str, Param]) -> str:
    flat = {k: v for k, v in _flat(base.to_dict()).items() if k not in _VOLATILE and k not in params}
    space = {name: dataclasses.asdict(p) for name, p in params.items()}
    return json.dumps({"base": flat, "space": space}, sort_keys=True, default=str)


def _check_same_search(study, record: str, where: str) -> None:
    """A study continues only the search it was started with."""
    stored = study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", record)
        return
    if stored == record:
        return
    old, new = json.loads(stored), json.loads(record)
    keys = [(part, k) for part in ("base", "space") for k in set(old[part]) | set(new[part])]
    changed = sorted(f"{part}.{k}" for part, k in keys if old[part].get(k) != new[part].get(k))
    raise ConfigError(
        f"{where} holds a search with other settings ({', '.join(changed[:5])} differ): rerun with the "
        "same config and options to continue it, or use another --out / --study-name for a new search"
    )


def _recover(optuna, study, owned: bool) -> None:
    """Fail trials a killed process left RUNNING (only when this process owns the study) and queue the
    parameters of every interrupted trial once more, under a new trial number and folder."""
    state = optuna.trial.TrialState
    killed = set()
    if owned:
        for trial in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
            log.info("trial %d was interrupted; marking it failed", trial.number)
            study.tell(trial.number, state=state.FAIL)
            killed.add(trial.number)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        failed = trial.state == state.FAIL and trial.user_attrs.get("interrupted")
        interrupted = trial.number in killed or failed
        if interrupted and trial.number not in retried and "retry_of" not in trial.user_attrs:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


class _Surplus(Exception):
    """A trial begun when the study already had its finished trials (another worker ended the last)."""


def _objective(optuna, base: RunConfig, params: dict[str, Param], out: Path, progress: bool, trials: int):
    """One trial: sample the settings, train in ``out/trials/NNN``, report each epoch, return the best."""
    from elta.engine.trainer import TrainingDivergedError, train

    def run(trial) -> float:
        _claim(optuna, trial, trials)
        cfg = apply_params(base, {name: p.suggest(trial) for name, p in params.items()})
        run_dir = out / "trials" / f"{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        saved = run_dir / "config.yaml"
        if saved.is_file() and RunConfig.from_yaml(saved).to_dict() != cfg.to_dict():
            raise RunExistsError(
                f"{run_dir} holds a run of other settings than trial {run_dir.name} (was the study "
                "database replaced?): move the trials/ folder away or use another --out"
            )
        metric = cfg.train.metric

        def on_epoch(epoch: int, row: dict) -> None:
            value = row[f"val_{metric}"]
            if math.isfinite(value):
                trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        try:
            summary = train(cfg, run_dir, resume=True, progress=progress, on_epoch=on_epoch)
        except TrainingDivergedError as exc:  # a setting that diverges is a bad one, not a broken search
            trial.set_user_attr("diverged", str(exc))
            raise optuna.TrialPruned(str(exc)) from exc
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        if not math.isfinite(summary["best_metric"]):
            raise optuna.TrialPruned(f"no finite validation {metric}")
        return summary["best_metric"]

    return run


def _claim(optuna, trial, trials: int) -> None:
    """Workers sharing a study stop at exactly ``trials`` finished trials: a trial runs only while fewer than
    that many earlier trials are finished or running. While running ones fill the quota it waits (one may
    belong to a dead worker: its heartbeat stops, it is failed and retried); once finished ones fill it, the
    trial ends as surplus (FAILED, not counted) and this worker stops."""
    state, study = optuna.trial.TrialState, trial.study
    while True:
        earlier = [t.state for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        finished = sum(s in (state.COMPLETE, state.PRUNED) for s in earlier)
        if finished >= trials:
            trial.set_user_attr("surplus", True)
            study.stop()
            raise _Surplus(f"the study has its {trials} finished trials")
        if finished + earlier.count(state.RUNNING) < trials:
            return
        time.sleep(1.0)
        optuna.storages.fail_stale_trials(study)


def run_tune(
    base: RunConfig,
    space: dict[str, Any],
    out: str | Path,
    *,
    trials: int = 8,
    storage: str | None = None,
    heartbeat: Heartbeat = Heartbeat(),
    sampler: str = "tpe",
    pruner: str = "median",
    seed: int = 0,
    study_name: str = "elta-tune",
    progress: bool = False,
):
    """Search ``space`` around ``base`` until ``trials`` trials have finished (completed or pruned),
    maximising the validation ``base.train.metric``. Writes ``out/trials/NNN/`` (one training run a
    trial), ``out/trials.csv`` and ``out/best.yaml``; rerunning continues the search. With ``storage`` (a
    database URL) any number of workers, on any machines, share the study and together finish exactly
    ``trials``; they may share ``out`` (trial folders are numbered by the database). Returns the
    ``optuna.Study``."""
    try:
        import optuna
    except ImportError as exc:
        raise UnavailableError(
            'elta tune needs Optuna: pip install optuna (or, in the elta checkout, pip install -e ".[tune]")'
        ) from exc
    params = parse_space(space)
    if trials < 1:
        raise ConfigError(f"--trials must be ≥ 1; got {trials}")
    if sampler not in SAMPLERS or pruner not in PRUNERS:
        raise ConfigError(f"sampler must be one of {SAMPLERS} and pruner one of {PRUNERS}")
    if sampler == "grid":
        _grid(params)
    if not base.data.data:
        raise ConfigError("no dataset: give --data, or data.data in the search file's base")
    out = Path(out)
    if base.train.cache_features and not base.train.feature_cache:  # one backbone pass for all trials
        base = base.override("train", feature_cache=str(out / "feature_cache.pt"))
    for p in params.values():  # every choice, or both ends of a range, must make a valid config
        for value in p.choices if p.choices is not None else (p.low, p.high):
            try:
                apply_params(base, {p.name: value})
            except ValueError as exc:
                raise ConfigError(
                    f"search space: {p.name} = {value!r} is not a valid setting: {exc}"
                ) from exc
    out.mkdir(parents=True, exist_ok=True)
    # One process per folder for the default file database; a shared one coordinates its workers itself.
    with _exclusive(out) if storage is None else contextlib.nullcontext():
        named = {"study_name": study_name, "direction": "maximize", "load_if_exists": True}
        study = optuna.create_study(storage=_storage(optuna, out, storage, heartbeat), **named)
        where = f"study {study_name!r} in {storage or out / 'study.db'}"
        _check_same_search(study, _search_record(base, params), where)
        _recover(optuna, study, owned=storage is None)
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        done = len(study.get_trials(deepcopy=False, states=states))
        study.sampler = _sampler(optuna, sampler, params, seed + len(study.trials), trials)
        # Steps are 1-based epochs: no trial is stopped on its first epoch alone.
        median = optuna.pruners.MedianPruner(n_warmup_steps=2)
        study.pruner = optuna.pruners.NopPruner() if pruner == "none" else median
        if done < trials:
            log.info("tuning: %d of %d trials finished; running the rest", done, trials)
            stop = optuna.study.MaxTrialsCallback(trials, states=states)
            objective = _objective(optuna, base, params, out, progress, trials)
            study.optimize(objective, trials - done, callbacks=[stop], catch=(_Surplus,))
        _write_results(study, base, params, out)
    return study


# --------------------------------------------------------------------------------------------- results


def _trial_rows(study, names: list[str]) -> list[dict]:
    rows = []
    for t in study.trials:
        row = {"number": t.number, "state": t.state.name, "value": t.value}
        row |= {name: t.params.get(name) for name in names}
        rows.append({**row, "epochs": len(t.intermediate_values), "run_dir": t.user_attrs.get("run_dir", "")})
    return rows


def _best_trial(study):
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value) if complete else None


def _write_results(study, base: RunConfig, params: dict[str, Param], out: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(_trial_rows(study, list(params)))
    atomic_write_text(out / "trials.csv", frame.to_csv(index=False))
    best = _best_trial(study)
    if best is None:
        log.warning("no trial completed (all pruned or failed): %s not written", out / "best.yaml")
        return
    cfg = apply_params(base, {k: v for k, v in best.params.items() if k in params})
    header = (
        f"# Best of {len(frame)} trials: trial {best.number}, validation {base.train.metric} "
        f"{best.value:.4f} (run {best.user_attrs.get('run_dir', '?')}).\n"
        f"#   elta train --config {out / 'best.yaml'} --out RUN_DIR\n"
    )
    atomic_write_text(out / "best.yaml", header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _format_value(value: Any) -> str:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"{value:g}" if is_number else str(value)


def format_trials(study, limit: int = 20) -> str:
    """A short table of the trials (best first) and the best one's settings."""
    names = list(dict.fromkeys(name for t in study.trials for name in t.params))
    rows = _trial_rows(study, names)
    rows.sort(key=lambda r: (r["value"] is None, -(r["value"] or 0.0), r["number"]))
    head = ["trial", "state", "value", *(name.removeprefix("enhancers.") for name in names), "epochs"]
    lines = [head]
    for r in rows[:limit]:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        settings = [_format_value(r[n]) for n in names]
        lines.append([str(r["number"]), r["state"].lower(), value, *settings, str(r["epochs"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines)
    if len(rows) > limit:
        text += f"\n… {len(rows) - limit} more in trials.csv"
    best = _best_trial(study)
    if best is not None:
        settings = ", ".join(f"{k}={_format_value(v)}" for k, v in best.params.items())
        text += f"\nbest: trial {best.number}, value {best.value:.4f}: {settings}"
    return text
