"""The ``elta pseudo-label`` and ``elta self-train`` subcommands (APDS self-training)."""

from __future__ import annotations

import argparse
from pathlib import Path

from elta.config import DataConfig, RunConfig

__all__ = ["add_selftrain_commands"]

_DEFAULT_BETAS = "1.0,1.1,1.2,1.25"
_DEFAULT_THRESHOLDS = "0.70,0.75,0.80,0.85,0.90"
_UNLABELED_HELP = (
    "unlabeled images: files, folders (recursive), .txt/.lst lists, or CSVs whose image column is one of "
    "path, image_path, image, image_id, image_name, filename, file, name (relative to the CSV's folder)"
)


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, e.g. 0.7,0.8; got {text!r}"
        ) from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _add_apds_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("APDS selection")
    g.add_argument(
        "--beta", type=float, help="sharpening strength β; with --threshold, skips the grid search"
    )
    g.add_argument("--threshold", type=float, help="selection threshold t on max_k q_k (with --beta)")
    g.add_argument(
        "--betas",
        type=_float_list,
        default=_float_list(_DEFAULT_BETAS),
        help=f"β grid (default {_DEFAULT_BETAS})",
    )
    g.add_argument(
        "--thresholds",
        type=_float_list,
        default=_float_list(_DEFAULT_THRESHOLDS),
        help=f"t grid (default {_DEFAULT_THRESHOLDS})",
    )
    g.add_argument(
        "--min-selected",
        type=int,
        help="smallest calibration selection a grid cell needs (default 5%% of the calibration set, ≥ 10)",
    )


def _print_pseudo(summary: dict) -> None:
    c = summary["counts"]
    print(
        f"pseudo-labelled {c['selected']} of {c['scored']} images (β={summary['beta']:g}, "
        f"t={summary['threshold']:g}, {summary['chosen_by']}) -> {summary['csv']}"
    )
    if c["labelled_skipped"]:
        print(f"left out {c['labelled_skipped']} images that are labelled in the calibration dataset")
    if c["unreadable"]:
        print(f"{c['unreadable']} unreadable images listed in {summary['unreadable_list']}")


def cmd_pseudo_label(args: argparse.Namespace) -> int:
    from elta.cli import _runtime
    from elta.workflows.pseudo import format_grid, pseudo_label

    calibration = None
    if args.calibrate_data:
        calibration = RunConfig(
            data=DataConfig(
                data=args.calibrate_data,
                images=args.calibrate_images,
                format=args.calibrate_format,
                splits=args.calibrate_splits,
            )
        )
    summary = pseudo_label(
        args.checkpoint,
        args.unlabeled,
        args.out,
        _runtime(args),
        calibration=calibration,
        calibrate_split=args.calibrate_split,
        beta=args.beta,
        threshold=args.threshold,
        betas=args.betas,
        thresholds=args.thresholds,
        min_selected=args.min_selected,
        weight=args.weight,
    )
    if summary["grid"]:
        print(f"calibration grid (selected / MAE), {summary['chosen_by']}:\n{format_grid(summary['grid'])}")
    _print_pseudo(summary)
    print(f"details: {Path(args.out).with_suffix('.json')}")
    return 0


def cmd_self_train(args: argparse.Namespace) -> int:
    from elta.cli import _apply_options, _progress
    from elta.workflows.selftrain import format_summary, self_train

    cfg = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    cfg = _apply_options(cfg, args)
    result = self_train(
        cfg,
        args.out,
        args.unlabeled,
        rounds=args.rounds,
        beta=args.beta,
        threshold=args.threshold,
        betas=args.betas,
        thresholds=args.thresholds,
        min_selected=args.min_selected,
        progress=_progress(),
    )
    print(format_summary(result))
    print(f"stages and metrics: {Path(args.out) / 'self_train.json'}")
    return 0


def add_selftrain_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``pseudo-label`` and ``self-train`` on the ``elta`` subcommand parser."""
    from elta.cli import _add_options
    from elta.config import FORMATS

    p = sub.add_parser(
        "pseudo-label",
        help="APDS pseudo-labels for unlabeled images from a teacher checkpoint",
        description="Score unlabeled images with a teacher, sharpen and select them by APDS, write a CSV "
        "for `elta train --pseudo-labels`. β and t are chosen on a labelled split, never on the pool.",
    )
    p.add_argument("--checkpoint", required=True, help="teacher checkpoint (file or run folder)")
    p.add_argument("--unlabeled", nargs="+", required=True, metavar="PATH", help=_UNLABELED_HELP)
    p.add_argument(
        "--out", required=True, help="pseudo-label CSV; its summary goes to the same name with .json"
    )
    g = p.add_argument_group("calibration (default: the teacher's training dataset)")
    g.add_argument("--calibrate-data", help="labelled annotations to choose β, t on")
    g.add_argument("--calibrate-images", help="their image root")
    g.add_argument("--calibrate-format", default="auto", choices=FORMATS, help="their format (default auto)")
    g.add_argument("--calibrate-splits", help="folder with train.txt / val.txt / test.txt (AVA)")
    g.add_argument("--calibrate-split", default="val", help="split to calibrate on (default val)")
    _add_apds_options(p)
    p.add_argument("--weight", type=float, default=1.0, help="loss weight written for every row (default 1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=cmd_pseudo_label)

    p = sub.add_parser(
        "self-train",
        help="teacher, then rounds of APDS pseudo-labels and a fresh student (resumable)",
        description="Train a teacher on the labelled data, pseudo-label the unlabeled images with APDS, train a "
        "student (fresh, same recipe) on both; repeat for --rounds. Rerun the same command to continue.",
    )
    p.add_argument("--unlabeled", nargs="+", required=True, metavar="PATH", help=_UNLABELED_HELP)
    p.add_argument("--out", required=True, help="folder for teacher/, round1/ …, self_train.json")
    p.add_argument("--rounds", type=int, default=1, help="pseudo-label / student rounds (default 1)")
    p.add_argument("--config", help="YAML config for the runs; options below override it")
    _add_apds_options(p)
    _add_options(p)
    p.set_defaults(func=cmd_self_train)
