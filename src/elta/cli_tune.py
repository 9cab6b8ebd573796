"""The ``elta tune`` subcommand: a hyper-parameter search whose trials are ``elta train`` runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from elta.config import RunConfig

__all__ = ["add_tune_commands"]


def cmd_tune(args: argparse.Namespace) -> int:
    from elta.cli import _apply_options, _progress
    from elta.workflows.tune import DEFAULT_SPACE, format_trials, load_search, run_tune

    if args.config:
        base, space = load_search(args.config)
        cfg = RunConfig.from_dict(base, source=f"{args.config} (base)")
    else:
        cfg, space = RunConfig(), DEFAULT_SPACE
    cfg = _apply_options(cfg, args)
    study = run_tune(
        cfg,
        space,
        args.out,
        trials=args.trials,
        storage=args.storage,
        sampler=args.sampler,
        pruner=args.pruner,
        seed=cfg.train.seed,
        study_name=args.study_name,
        progress=_progress(),
    )
    out = Path(args.out)
    print(format_trials(study))
    if (out / "best.yaml").is_file():
        print(f"best config: {out / 'best.yaml'}  (elta train --config {out / 'best.yaml'} --out RUN_DIR)")
    print(f"all trials: {out / 'trials.csv'}")
    return 0


def add_tune_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``tune`` on the ``elta`` subcommand parser."""
    from elta.cli import _add_options
    from elta.workflows.tune import PRUNERS, SAMPLERS

    p = sub.add_parser(
        "tune",
        help="search hyper-parameters (Optuna TPE); every trial is an elta train run (resumable)",
        description="Search settings around a base config, maximising the validation metric (train.metric, "
        "default srcc). Without a space: the original ELTA search (batch size, lr, FLSA weight, TFA τ1, τ2). "
        "Rerun the same command to continue an interrupted search.",
    )
    p.add_argument(
        "--config",
        help="search YAML: base (a run config, or a path to one) and space (dotted setting -> "
        "{choices: [...]} or {low, high, log, step}); see examples/search.yaml",
    )
    p.add_argument("--out", required=True, help="folder for study.db, trials/NNN/, trials.csv, best.yaml")
    p.add_argument("--trials", type=int, default=8, help="finished trials to reach (default 8)")
    p.add_argument("--storage", help="Optuna database URL shared by several workers (default DIR/study.db)")
    p.add_argument("--study-name", default="elta-tune", help="study name in the database (default elta-tune)")
    p.add_argument("--sampler", default="tpe", choices=SAMPLERS, help="tpe (default), random, or grid")
    p.add_argument(
        "--pruner", default="median", choices=PRUNERS, help="stop trials below the median (default) or none"
    )
    _add_options(p)  # the base config's options; --seed seeds the sampler as well as every trial
    p.set_defaults(func=cmd_tune)
