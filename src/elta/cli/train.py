"""Commands that train: ``train``, ``ablate``, ``self-train`` and ``tune``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from elta import launch
from elta.cli.apds import UNLABELED_HELP, add_apds_options
from elta.cli.options import (
    TRAIN_SETTINGS,
    add_config_options,
    add_enhancer_options,
    apply_options,
    build_runtime,
    progress,
)
from elta.config import RunConfig
from elta.errors import ConfigError

__all__ = ["add_commands"]


def _config(args: argparse.Namespace) -> RunConfig:
    """The config file (if any) with the command line over it, enhancers checked."""
    cfg = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    return apply_options(cfg, args)


def train(args: argparse.Namespace) -> int:
    from elta.engine.trainer import train as train_run
    from elta.enhancers import check_enhancers
    from elta.workflows.nni_report import nni_wrap

    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a run folder?")
        cfg = RunConfig.from_yaml(saved)
        cfg = dataclasses.replace(cfg, enhancers=check_enhancers(cfg.enhancers))
    else:
        cfg = _config(args)
    if args.print_config:
        backbone = None
        if cfg.model.init_from:  # the run trains the checkpoint's backbone, with its recipe
            from elta.models.checkpoint import load_checkpoint

            backbone = load_checkpoint(cfg.model.init_from).spec.backbone
        print(cfg.resolved(backbone).yaml_text(), end="")
        return 0
    if not args.resume and not args.out:
        raise ConfigError("--out RUN_DIR is required (or --resume RUN_DIR)")
    run_dir = Path(args.resume or args.out)
    cfg, on_epoch, report_final = nni_wrap(cfg)  # a no-op unless running as an NNI trial
    summary = train_run(cfg, run_dir, resume=bool(args.resume), progress=progress(), on_epoch=on_epoch)
    report_final(summary)
    if launch.rank() > 0:
        return 0  # under torchrun rank 0 prints the summary
    print(f"best {summary['metric']} {summary['best_metric']:.4f} at epoch {summary['best_epoch']}")
    print(f"checkpoints: {summary['best']}  {summary['last']}")
    print(f"per-epoch metrics: {summary['metrics_csv']}")
    if args.calibrate != "none":  # fit the map on the validation split and store it in best.pt
        from elta.calibration import format_selection
        from elta.workflows.calibrate import calibrate_checkpoint

        best = summary["best"]
        result = calibrate_checkpoint(best, cfg, build_runtime(cfg.runtime), method=args.calibrate)
        if args.calibrate == "auto":
            print(format_selection(result["selection"]))
        stored = result["calibration"]
        print(
            f"calibration: {stored['method'] if stored else 'none (no map lowers the tail MAE)'} stored in {best}"
        )
    return 0


def ablate(args: argparse.Namespace) -> int:
    from elta.workflows.ablate import run_ablation

    cfg = _config(args)
    if cfg.enhancers:
        raise ConfigError("give enhancers through --variants, not --tfa/--flsa-weight/--enhancer")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    run_ablation(cfg, variants, args.seeds, args.out, unlabeled=args.unlabeled, progress=progress())
    out = Path(args.out)
    print((out / "ablation.md").read_text())
    print(f"wrote {out / 'ablation.csv'} and {out / 'ablation.md'}")
    return 0


def self_train(args: argparse.Namespace) -> int:
    from elta.workflows.selftrain import format_summary
    from elta.workflows.selftrain import self_train as self_train_run

    apds = {key: getattr(args, key) for key in ("beta", "threshold", "betas", "thresholds", "min_selected")}
    result = self_train_run(
        _config(args), args.out, args.unlabeled, rounds=args.rounds, progress=progress(), **apds
    )
    print(format_summary(result))
    print(f"stages and metrics: {Path(args.out) / 'self_train.json'}")
    return 0


def tune(args: argparse.Namespace) -> int:
    from elta.workflows.tune import DEFAULT_SPACE, Heartbeat, format_trials, load_search, run_tune

    if args.config:
        base, space = load_search(args.config)
        cfg = RunConfig.from_dict(base, source=f"{args.config} (base)")
    else:
        cfg, space = RunConfig(), DEFAULT_SPACE
    cfg = apply_options(cfg, args)
    search = {key: getattr(args, key) for key in ("trials", "storage", "sampler", "pruner", "study_name")}
    search["heartbeat"] = Heartbeat(args.heartbeat_interval, args.heartbeat_grace)
    study = run_tune(cfg, space, args.out, seed=cfg.train.seed, progress=progress(), **search)
    out = Path(args.out)
    print(format_trials(study))
    if (out / "best.yaml").is_file():
        print(f"best config: {out / 'best.yaml'}  (elta train --config {out / 'best.yaml'} --out RUN_DIR)")
    print(f"all trials: {out / 'trials.csv'}")
    return 0


def _training_options(p: argparse.ArgumentParser) -> None:
    add_config_options(p, TRAIN_SETTINGS)
    add_enhancer_options(p)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``train``, ``ablate``, ``self-train`` and ``tune``."""
    p = sub.add_parser(
        "train", help="train a model on a dataset", description="Train a model; writes RUN_DIR."
    )
    p.add_argument("--config", help="YAML config (sections data / model / train / runtime / enhancers); "
                   "options below override it")  # fmt: skip
    p.add_argument("--out", help="run directory for config.yaml, metrics.csv, last.pt, best.pt, train.log")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from RUN_DIR/last.pt")
    show = "print the resolved config (file + options) and exit"
    p.add_argument("--print-config", action="store_true", help=show)
    p.add_argument(
        "--calibrate", default="none", choices=("none", "auto", "affine", "quantile", "isotonic"),
        help="then fit a calibration map on the validation split and store it in best.pt, as elta calibrate "
        "--method does (auto: the map, or none, with the lowest tail MAE)",
    )  # fmt: skip
    _training_options(p)
    p.set_defaults(func=train)

    p = sub.add_parser("ablate", help="train variants (baseline, tfa, flsa, …) on the same seeds and compare")
    variants = "comma-separated: baseline, or enhancers joined by + with optional :k=v settings"
    p.add_argument("--variants", default="baseline,tfa,flsa,tfa+flsa", help=variants)
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (from --seed on; default 3)")
    p.add_argument("--out", required=True, help="folder for runs/, ablation.csv, ablation.md")
    p.add_argument("--config", help="YAML config shared by every variant")
    p.add_argument("--unlabeled", nargs="+", help="unlabelled images for the apds variant (self-training)")
    _training_options(p)
    p.set_defaults(func=ablate)

    p = sub.add_parser(
        "self-train",
        help="teacher, then rounds of APDS pseudo-labels and a fresh student (resumable)",
        description="Train a teacher on the labelled data, pseudo-label the unlabeled images with APDS, train a "
        "student (fresh, same recipe) on both; repeat for --rounds. Rerun the same command to continue.",
    )
    p.add_argument("--unlabeled", nargs="+", required=True, metavar="PATH", help=UNLABELED_HELP)
    p.add_argument("--out", required=True, help="folder for teacher/, round1/ …, self_train.json")
    p.add_argument("--rounds", type=int, default=1, help="pseudo-label / student rounds (default 1)")
    p.add_argument("--config", help="YAML config for the runs; options below override it")
    add_apds_options(p)
    _training_options(p)
    p.set_defaults(func=self_train)

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
    p.add_argument(
        "--storage",
        help="database shared by several workers, e.g. postgresql://USER:PASSWORD@HOST:5432/DB "
        '(pip install "elta[postgres]"); default DIR/study.db, one worker',
    )
    p.add_argument(
        "--heartbeat-interval", type=int, default=60, metavar="S",
        help="with --storage: a running trial's heartbeat period in seconds (default 60)",
    )  # fmt: skip
    p.add_argument(
        "--heartbeat-grace", type=int, default=300, metavar="S",
        help="with --storage: a trial silent this long is failed and retried once (default 300)",
    )  # fmt: skip
    p.add_argument("--study-name", default="elta-tune", help="study name in the database (default elta-tune)")
    p.add_argument("--sampler", default="tpe", choices=SAMPLERS, help="tpe (default), random, or grid")
    p.add_argument(
        "--pruner", default="median", choices=PRUNERS, help="stop trials below the median (default) or none"
    )
    _training_options(p)  # the base config's options; --seed seeds the sampler as well as every trial
    p.set_defaults(func=tune)
