"""The ``elta`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from elta import launch
from elta.config import AMP_MODES, FORMATS, LOSSES, METRICS, OPTIMIZERS, SCHEDULES, RunConfig

log = logging.getLogger("elta.cli")

# (flag, config section, config key, type, help) — the train options, also read by `demo` and `evaluate`.
TRAIN_OPTIONS: list[tuple[str, str, str, type, str]] = [
    (
        "--data",
        "data",
        "data",
        str,
        "annotation file or dataset folder (AVA.txt, ELTA CSV folder, KonIQ, PARA, AADB, CSV)",
    ),
    (
        "--images",
        "data",
        "images",
        str,
        "image root folder (default: the format's usual folder next to --data)",
    ),
    ("--format", "data", "format", str, f"annotation format: {'|'.join(FORMATS)} (default auto)"),
    ("--splits", "data", "splits", str, "folder with train.txt / val.txt / test.txt split lists (AVA)"),
    (
        "--val-fraction",
        "data",
        "val_fraction",
        float,
        "fraction of train held out when there is no val split",
    ),
    ("--image-column", "data", "image_column", str, "generic CSV: image column name"),
    ("--mos-column", "data", "mos_column", str, "generic CSV: MOS column name"),
    ("--split-column", "data", "split_column", str, "generic CSV: split column name"),
    ("--group-column", "data", "group_column", str, "generic CSV: group / tag column name"),
    ("--workers", "data", "workers", int, "data-loading processes (default: from the CPU count)"),
    (
        "--backbone",
        "model",
        "backbone",
        str,
        "timm model name (default swinv2_base_window8_256, the paper's)",
    ),
    ("--weights", "model", "weights", str, "imagenet | none | PATH to a backbone weights file"),
    ("--image-size", "model", "image_size", int, "input size (default: the backbone's pretrained size)"),
    ("--resize", "model", "resize", int, "square resize before the random crop (default image_size·300/256)"),
    ("--neck-dim", "model", "neck_dim", int, "add a Linear+ReLU neck of this width before the head"),
    ("--dropout", "model", "dropout", float, "dropout before the scalar head (default 0.75)"),
    ("--epochs", "train", "epochs", int, "epochs (default 20)"),
    ("--batch-size", "train", "batch_size", int, "batch size (default 48)"),
    ("--lr", "train", "lr", float, "learning rate (default 1e-5)"),
    ("--optimizer", "train", "optimizer", str, f"{'|'.join(OPTIMIZERS)} (default adam)"),
    ("--weight-decay", "train", "weight_decay", float, "weight decay (default 0)"),
    ("--schedule", "train", "schedule", str, f"learning-rate schedule: {'|'.join(SCHEDULES)}"),
    ("--warmup-epochs", "train", "warmup_epochs", float, "linear warm-up length in epochs"),
    ("--grad-clip", "train", "grad_clip", float, "clip the gradient norm to this value (0 = off)"),
    ("--loss", "train", "loss", str, f"{'|'.join(LOSSES)}: emd needs vote distributions (default auto)"),
    ("--metric", "train", "metric", str, f"validation metric that picks best.pt: {'|'.join(METRICS)}"),
    ("--seed", "train", "seed", int, "random seed (default 0)"),
    ("--device", "train", "device", str, "auto | cpu | cuda | cuda:N | mps"),
    ("--checkpoint-every", "train", "checkpoint_every", int, "also write last.pt every N steps in an epoch"),
    ("--strict", "data", "strict", bool, "any bad row is an error instead of a reported skip"),
    (
        "--pseudo-labels",
        "data",
        "pseudo_labels",
        str,
        "pseudo-label CSV (elta pseudo-label) added to training",
    ),
    ("--pseudo-weight", "data", "pseudo_weight", float, "loss weight of pseudo-labelled rows (default 1)"),
    (
        "--init-from",
        "model",
        "init_from",
        str,
        "start from this checkpoint (elta's or the original release's)",
    ),
    (
        "--freeze-backbone",
        "model",
        "freeze_backbone",
        bool,
        "train only the neck and head (regressor retraining)",
    ),
    ("--reset-head", "model", "reset_head", bool, "re-initialise the head after --init-from"),
    (
        "--cache-features",
        "train",
        "cache_features",
        bool,
        "frozen backbone: compute features once, reuse them",
    ),
    (
        "--feature-cache",
        "train",
        "feature_cache",
        str,
        "feature cache file (default RUN_DIR/feature_cache.pt)",
    ),
    (
        "--amp",
        "train",
        "amp",
        str,
        f"mixed precision: {'|'.join(AMP_MODES)} (default auto = bf16 on CUDA GPUs that support it, else off)",
    ),
    ("--channels-last", "train", "channels_last", bool, "model and images in channels-last memory format"),
    (
        "--compile",
        "train",
        "compile",
        bool,
        "torch.compile the backbone (slow first steps; needs a C++ compiler on CPU)",
    ),
]
ENHANCER_FLAGS = (
    "--tfa",
    "--tfa-tau1",
    "--tfa-tau2",
    "--tfa-pairs",
    "--flsa-weight",
    "--flsa-range",
    "--enhancer",
)
DATA_KEYS = (
    "--data",
    "--images",
    "--format",
    "--splits",
    "--image-column",
    "--mos-column",
    "--split-column",
    "--group-column",
)


def _add_options(parser: argparse.ArgumentParser, flags: tuple[str, ...] | None = None) -> None:
    for flag, _section, key, kind, help_text in TRAIN_OPTIONS:
        if flags is None or flag in flags:
            if kind is bool:
                parser.add_argument(flag, dest=key, action="store_true", default=None, help=help_text)
            else:
                parser.add_argument(flag, dest=key, type=kind, default=None, help=help_text)
    if flags is None or "--score-range" in flags:
        parser.add_argument(
            "--score-range",
            dest="score_range",
            type=float,
            nargs=2,
            default=None,
            metavar=("LOW", "HIGH"),
            help="generic CSV: the rating scale's ends",
        )
    if flags is None:
        group = parser.add_argument_group("enhancers (ELTA)")
        group.add_argument(
            "--tfa", action="store_true", default=None, help="tail feature augmentation (mixup)"
        )
        group.add_argument("--tfa-tau1", type=float, help="TFA anchor temperature τ1 (default 0.5)")
        group.add_argument("--tfa-tau2", type=float, help="TFA partner temperature τ2 (default 2)")
        group.add_argument("--tfa-pairs", type=int, help="mixed samples appended per batch (default 1)")
        group.add_argument("--flsa-weight", type=float, help="feature-label similarity alignment weight w")
        group.add_argument(
            "--flsa-range", choices=("batch", "dataset"), help="FLSA label range R (default batch)"
        )
        group.add_argument(
            "--enhancer",
            action="append",
            metavar="NAME[:k=v,...]",
            help="any registered enhancer with settings, e.g. tfa:tau1=0.3 (repeatable)",
        )


def _add_inference_amp(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--amp",
        dest="inference_amp",
        choices=AMP_MODES,
        default="off",
        help="autocast the backbone: auto = bf16 on CUDA GPUs that support it (default off: float32)",
    )


def _enhancers_from_args(current: list[dict], args: argparse.Namespace) -> list[dict]:
    """The config's enhancer list with the command line's additions and changes."""
    from elta.enhancers import parse_enhancer

    specs = {e["name"]: dict(e) for e in current}
    tfa = {
        k: v
        for k, v in (
            ("tau1", getattr(args, "tfa_tau1", None)),
            ("tau2", getattr(args, "tfa_tau2", None)),
            ("pairs", getattr(args, "tfa_pairs", None)),
        )
        if v is not None
    }
    if getattr(args, "tfa", None) or tfa:
        specs["tfa"] = {**specs.get("tfa", {"name": "tfa"}), **tfa}
    flsa = {
        k: v
        for k, v in (
            ("weight", getattr(args, "flsa_weight", None)),
            ("range", getattr(args, "flsa_range", None)),
        )
        if v is not None
    }
    if flsa:
        specs["flsa"] = {**specs.get("flsa", {"name": "flsa"}), **flsa}
    for text in getattr(args, "enhancer", None) or []:
        spec = parse_enhancer(text)
        specs[spec["name"]] = {**specs.get(spec["name"], {}), **spec}
    return list(specs.values())


def _apply_options(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """Command-line values override the config file's, section by section."""
    for section in ("data", "model", "train"):
        values = {key: getattr(args, key, None) for flag, sec, key, _t, _h in TRAIN_OPTIONS if sec == section}
        if section == "data":
            score_range = getattr(args, "score_range", None)
            values["score_range"] = tuple(score_range) if score_range else None
        cfg = cfg.override(section, **values)
    enhancers = _enhancers_from_args(cfg.enhancers, args)
    return dataclasses.replace(cfg, enhancers=enhancers) if enhancers != cfg.enhancers else cfg


def _progress() -> bool:
    return sys.stderr.isatty()


def _runtime(args: argparse.Namespace):
    """The inference runtime from --device, --batch-size, --workers and --amp."""
    from elta.engine.runtime import Runtime

    return Runtime.create(
        args.device or "auto",
        amp=getattr(args, "inference_amp", "off"),
        batch_size=args.batch_size,
        workers=args.workers,
        progress=_progress(),
    )


# --------------------------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from elta.engine.trainer import train
    from elta.workflows.nni_report import nni_wrap

    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise SystemExit(f"--resume {run_dir}: no config.yaml there; is it a run folder?")
        cfg = RunConfig.from_yaml(saved)
    else:
        if not args.out:
            raise SystemExit("elta train: --out RUN_DIR is required (or --resume RUN_DIR)")
        run_dir = Path(args.out)
        cfg = RunConfig.from_yaml(args.config) if args.config else RunConfig()
        cfg = _apply_options(cfg, args)
    cfg, on_epoch, report_final = nni_wrap(cfg)  # a no-op unless running as an NNI trial
    summary = train(cfg, run_dir, resume=bool(args.resume), progress=_progress(), on_epoch=on_epoch)
    report_final(summary)
    if launch.rank() > 0:
        return 0  # under torchrun rank 0 prints the summary
    print(f"best {summary['metric']} {summary['best_metric']:.4f} at epoch {summary['best_epoch']}")
    print(f"checkpoints: {summary['best']}  {summary['last']}")
    print(f"per-epoch metrics: {summary['metrics_csv']}")
    return 0


def _data_config_for(args: argparse.Namespace, saved: dict | None) -> RunConfig:
    """Data settings from the command line, falling back to the checkpoint's training data (``saved``)."""
    cfg = RunConfig()
    if args.data is None and saved:
        cfg = RunConfig.from_dict(saved)
        log.info("no --data given: evaluating on the checkpoint's training dataset %s", cfg.data.data)
    elif args.data is None:
        raise SystemExit("elta evaluate: --data is required (the checkpoint records no dataset)")
    return _apply_options(cfg, args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from elta.calibration import format_calibration_report
    from elta.engine.evaluate import evaluate_checkpoint
    from elta.metrics import format_metrics
    from elta.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    cfg = _data_config_for(args, checkpoint.config)
    metrics = evaluate_checkpoint(
        checkpoint, cfg, args.out, _runtime(args), split=args.split, calibrated=not args.no_calibration
    )
    title = f"{Path(checkpoint.path).name} on split '{args.split}'"
    if "before_calibration" in metrics:
        report = {"before": metrics["before_calibration"], "after": metrics}
        print(
            format_calibration_report(
                report, title=f"{title}: without and with its {metrics['calibration']} map"
            )
        )
    else:
        print(format_metrics(metrics, title=title))
    out = Path(args.out)
    print(f"\nwrote {out / 'metrics.json'}, {out / 'predictions.csv'}, {out / 'report.png'}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from elta.calibration import format_calibration_report
    from elta.models.checkpoint import load_checkpoint
    from elta.workflows.calibrate import calibrate_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    cfg = _data_config_for(args, checkpoint.config)
    result = calibrate_checkpoint(
        checkpoint, cfg, _runtime(args), method=args.method, split=args.split, out=args.out
    )
    title = f"{args.method} calibration fitted on split '{args.split}' (same rows: SRCC cannot change)"
    print(format_calibration_report(result["report"], title=title))
    print(
        f"\nstored in {result['checkpoint']}: predict and evaluate apply it (--no-calibration to switch off)"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from elta.engine.predictor import Predictor, write_scores

    predictor = Predictor.from_checkpoint(args.checkpoint, _runtime(args), calibrated=not args.no_calibration)
    frame = predictor.score(args.paths)
    failed = int((frame["error"] != "").sum())
    if args.out:
        write_scores(frame, args.out)
        print(f"scored {len(frame) - failed} images ({failed} unreadable) -> {args.out}")
    else:
        print(frame.to_csv(index=False, float_format="%.4f"), end="")
    if failed:
        for _, row in frame[frame["error"] != ""].head(10).iterrows():
            print(f"  unreadable: {row['error']}", file=sys.stderr)
    return 0 if failed < len(frame) else 1


def cmd_data_check(args: argparse.Namespace) -> int:
    from elta.data.check import check_dataset, write_problems
    from elta.engine.prepare import read_dataset

    cfg = _apply_options(RunConfig(), args)
    df = read_dataset(cfg)
    report = check_dataset(df, deep=not args.quick, progress=_progress())
    print(report.format())
    if args.out and report.problems:
        print(f"problem list: {write_problems(report.problems, args.out)}")
    return 1 if report.problems else 0


def cmd_data_cache(args: argparse.Namespace) -> int:
    from elta.data.cache import build_cache
    from elta.engine.prepare import read_dataset

    cfg = _apply_options(RunConfig(), args)
    workers = cfg.data.workers if cfg.data.workers is not None else min(8, os.cpu_count() or 1)
    summary = build_cache(
        read_dataset(cfg),
        args.out,
        size=args.size,
        mode=args.mode,
        quality=args.quality,
        progress=_progress(),
        workers=workers,
    )
    print(
        f"cached {summary['images']} images ({summary['written']} written, {summary['reused']} unchanged) "
        f"in {summary['cache']}: {summary['mode']} {summary['size']} px, {summary['bytes'] / 2**20:.1f} MiB"
    )
    if summary["bad"]:
        print(f"{summary['bad']} images could not be read: listed in {summary['bad_list']}")
    print(f"train or evaluate from it with --images {summary['cache']}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from elta.data.demo import make_demo_dataset

    path = make_demo_dataset(args.out, n=args.n, seed=args.seed, progress=_progress())
    print(f"demo dataset: {path} ({args.n} images in {Path(args.out) / 'images'})")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from elta.workflows.ablate import run_ablation

    cfg = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    cfg = _apply_options(cfg, args)
    if cfg.enhancers:
        raise SystemExit("elta ablate: give enhancers through --variants, not --tfa/--flsa-weight/--enhancer")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    run_ablation(cfg, variants, args.seeds, args.out, unlabeled=args.unlabeled, progress=_progress())
    out = Path(args.out)
    print((out / "ablation.md").read_text())
    print(f"wrote {out / 'ablation.csv'} and {out / 'ablation.md'}")
    return 0


def cmd_import_checkpoint(args: argparse.Namespace) -> int:
    from elta.models.checkpoint import import_original_checkpoint

    out = import_original_checkpoint(
        args.source, args.out, head=args.head, backbone=args.backbone, image_size=args.image_size
    )
    print(f"wrote {out}: use it with --checkpoint (predict, evaluate) or --init-from (train)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from elta.workflows.demo import run_demo

    run_demo(args.out, progress=_progress(), device=args.device)
    return 0


# ----------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elta", description="Long-tail-aware image aesthetics assessment.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--version", action="version", version=f"elta {__import__('elta').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train", help="train a model on a dataset", description="Train a model; writes RUN_DIR."
    )
    p.add_argument("--config", help="YAML config (sections data / model / train); options below override it")
    p.add_argument("--out", help="run directory for config.yaml, metrics.csv, last.pt, best.pt, train.log")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from RUN_DIR/last.pt")
    _add_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("ablate", help="train variants (baseline, tfa, flsa, …) on the same seeds and compare")
    p.add_argument(
        "--variants",
        default="baseline,tfa,flsa,tfa+flsa",
        help="comma-separated: baseline, or enhancers joined by + with optional :k=v settings",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (from --seed on; default 3)")
    p.add_argument("--out", required=True, help="folder for runs/, ablation.csv, ablation.md")
    p.add_argument("--config", help="YAML config shared by every variant")
    p.add_argument("--unlabeled", nargs="+", help="unlabelled images for the apds variant (self-training)")
    _add_options(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a dataset split")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--split", default="test", help="train | val | test | all (default test)")
    p.add_argument("--out", required=True, help="folder for metrics.json, predictions.csv, report.png")
    p.add_argument("--no-calibration", action="store_true", help="ignore a calibration map in the checkpoint")
    p.add_argument("--batch-size", type=int, default=32)
    _add_inference_amp(p)
    _add_options(p, DATA_KEYS + ("--workers", "--device", "--strict", "--score-range"))
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="fit a monotone map against regression to the mean; store it")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument(
        "--method",
        default="affine",
        choices=("affine", "quantile", "isotonic"),
        help="affine stretch (default), quantile mapping onto the training labels, or isotonic",
    )
    p.add_argument(
        "--split", default="val", help="split whose predictions the map is fitted on (default val)"
    )
    p.add_argument(
        "--out", help="write the calibrated checkpoint here (default: update the checkpoint in place)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    _add_options(p, DATA_KEYS + ("--workers", "--device", "--strict", "--score-range"))
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("predict", help="score photos with a checkpoint")
    p.add_argument("paths", nargs="+", help="image files, folders (recursive) or .txt lists of paths")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--out", help="scores.csv or scores.json (default: CSV on standard output)")
    p.add_argument("--no-calibration", action="store_true", help="ignore a calibration map in the checkpoint")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None)
    _add_inference_amp(p)
    p.set_defaults(func=cmd_predict)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="report bad rows and unreadable images, and the label statistics")
    _add_options(p, DATA_KEYS + ("--strict", "--score-range"))
    p.add_argument("--quick", action="store_true", help="only check that images exist and have a header")
    p.add_argument("--out", help="write the problem list to this CSV")
    p.set_defaults(func=cmd_data_check)
    p = data.add_parser(
        "cache",
        help="decode and resize every image once into a folder that --images can point at",
        description="Decode every image of the dataset (all splits) once, resize it, and store it as a "
        "plain image under the same relative path in --out; train, evaluate or check with --images OUT.",
    )
    _add_options(p, DATA_KEYS + ("--strict", "--score-range", "--workers"))
    p.add_argument("--out", required=True, help="cache folder (new, empty, or an earlier cache to update)")
    p.add_argument(
        "--size", type=int, default=300, help="side length in px (default 300, the paper's resize)"
    )
    p.add_argument(
        "--mode",
        choices=("square", "short"),
        default="square",
        help="square: size×size like the training resize (default); short: shorter side = size, aspect kept",
    )
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the cached files (default 95)")
    p.set_defaults(func=cmd_data_cache)

    p = sub.add_parser("import-checkpoint", help="convert a checkpoint of the original ELTA release")
    p.add_argument("source", help="the original checkpoint (.pth with 'state_dict': vit.*, linear_emd.*, …)")
    p.add_argument("out", help="the elta checkpoint to write")
    p.add_argument(
        "--head",
        default="auto",
        choices=("auto", "distribution", "scalar"),
        help="which of its heads was trained (auto: read from the optimizer state)",
    )
    p.add_argument("--backbone", default="swinv2_base_window8_256")
    p.add_argument("--image-size", type=int, default=256)
    p.set_defaults(func=cmd_import_checkpoint)

    p = sub.add_parser("demo-data", help="build the long-tailed demo dataset (AVA layout)")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=1500, help="number of images (default 1500)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo", help="build demo data, train, evaluate and print the metrics")
    p.add_argument(
        "--out", default="elta-demo", help="folder for the data, run and evaluation (default elta-demo)"
    )
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)

    from elta.cli_selftrain import add_selftrain_commands

    add_selftrain_commands(sub)

    from elta.cli_tune import add_tune_commands

    add_tune_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    quiet = args.quiet or launch.rank() > 0  # under torchrun rank 0 reports progress
    logging.getLogger("elta").setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        if launch.launched_by_torchrun() and args.command != "train":
            raise ValueError(
                "under torchrun only `elta train` runs distributed; run this command without torchrun"
            )
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"elta {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
