"""Commands that use a trained checkpoint: ``evaluate``, ``calibrate``, ``predict`` and ``pseudo-label``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from elta.cli.apds import UNLABELED_HELP, add_apds_options
from elta.cli.options import (
    DATA_SETTINGS,
    INFERENCE_RUNTIME,
    add_config_options,
    apply_options,
    build_runtime,
    given,
)
from elta.config import FORMATS, DataConfig, RunConfig, RuntimeConfig
from elta.errors import ConfigError

__all__ = ["add_commands"]

log = logging.getLogger(__name__)


def _data_config(args: argparse.Namespace, saved: dict | None) -> RunConfig:
    """Data settings from the command line, falling back to the checkpoint's training data (``saved``)."""
    cfg = RunConfig()
    if given(args, "data", "data") is None and saved:
        cfg = dataclasses.replace(RunConfig.from_dict(saved), runtime=RuntimeConfig())  # where it runs: here
        log.info("no --data given: evaluating on the checkpoint's training dataset %s", cfg.data.data)
    elif given(args, "data", "data") is None:
        raise ConfigError("--data is required (the checkpoint records no dataset)")
    return apply_options(cfg, args)


def evaluate(args: argparse.Namespace) -> int:
    from elta.calibration import format_calibration_report
    from elta.engine.evaluate import evaluate_checkpoint
    from elta.metrics import format_metrics
    from elta.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    cfg = _data_config(args, checkpoint.config)
    runtime = build_runtime(cfg.runtime)
    calibrated = not args.no_calibration
    metrics = evaluate_checkpoint(checkpoint, cfg, args.out, runtime, split=args.split, calibrated=calibrated)
    title = f"{Path(checkpoint.path).name} on split '{args.split}'"
    if "before_calibration" in metrics:
        report = {"before": metrics["before_calibration"], "after": metrics}
        title = f"{title}: without and with its {metrics['calibration']} map"
        print(format_calibration_report(report, title=title))
    else:
        print(format_metrics(metrics, title=title))
    out = Path(args.out)
    print(f"\nwrote {out / 'metrics.json'}, {out / 'predictions.csv'}, {out / 'report.png'}")
    return 0


def calibrate(args: argparse.Namespace) -> int:
    from elta.calibration import format_calibration_report
    from elta.models.checkpoint import load_checkpoint
    from elta.workflows.calibrate import calibrate_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    cfg = _data_config(args, checkpoint.config)
    runtime = build_runtime(cfg.runtime)
    result = calibrate_checkpoint(
        checkpoint, cfg, runtime, method=args.method, split=args.split, out=args.out
    )
    title = f"{args.method} calibration fitted on split '{args.split}' (same rows: SRCC cannot change)"
    print(format_calibration_report(result["report"], title=title))
    print(
        f"\nstored in {result['checkpoint']}: predict and evaluate apply it (--no-calibration to switch off)"
    )
    return 0


def predict(args: argparse.Namespace) -> int:
    from elta.engine.predictor import Predictor, score_format, write_scores

    if args.out:
        score_format(args.out)  # an unknown suffix fails before any scoring
    runtime = build_runtime(apply_options(RunConfig(), args).runtime)
    predictor = Predictor.from_checkpoint(
        args.checkpoint, runtime, calibrated=not args.no_calibration, backend=args.runtime
    )
    frame = predictor.score(args.paths)
    failed = int((frame["error"] != "").sum())
    if args.out:
        write_scores(frame, args.out)
        print(f"scored {len(frame) - failed} images ({failed} unreadable) -> {args.out}")
    else:
        print(frame.to_csv(index=False, float_format="%.4f"), end="")
    for _, row in frame[frame["error"] != ""].head(10).iterrows():
        print(f"  unreadable: {row['error']}", file=sys.stderr)
    return 0 if failed < len(frame) else 1


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


def pseudo_label(args: argparse.Namespace) -> int:
    from elta.workflows.pseudo import format_grid
    from elta.workflows.pseudo import pseudo_label as pseudo_label_run

    calibration = None
    if args.calibrate_data:
        data = DataConfig(
            data=args.calibrate_data,
            images=args.calibrate_images,
            format=args.calibrate_format,
            splits=args.calibrate_splits,
        )
        calibration = RunConfig(data=data)
    runtime = build_runtime(apply_options(RunConfig(), args).runtime)
    summary = pseudo_label_run(
        args.checkpoint,
        args.unlabeled,
        args.out,
        runtime,
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


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``evaluate``, ``calibrate``, ``predict`` and ``pseudo-label``."""
    no_calibration = {"action": "store_true", "help": "ignore a calibration map in the checkpoint"}

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a dataset split")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--split", default="test", help="train | val | test | all (default test)")
    p.add_argument("--out", required=True, help="folder for metrics.json, predictions.csv, report.png")
    p.add_argument("--no-calibration", **no_calibration)
    add_config_options(p, DATA_SETTINGS, INFERENCE_RUNTIME)
    p.set_defaults(func=evaluate)

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
    add_config_options(p, DATA_SETTINGS, INFERENCE_RUNTIME)
    p.set_defaults(func=calibrate)

    p = sub.add_parser("predict", help="score photos with a checkpoint")
    p.add_argument("paths", nargs="+", help="image files, folders (recursive) or .txt lists of paths")
    p.add_argument("--checkpoint", required=True, help="checkpoint file, run folder or exported .onnx")
    p.add_argument(
        "--runtime",
        default="auto",
        choices=("auto", "torch", "onnx"),
        help="auto (default: .onnx on onnxruntime, a checkpoint on PyTorch), torch, or onnx",
    )
    p.add_argument(
        "--out", help="scores file: .csv, .json, .jsonl or .parquet (default: CSV on standard output)"
    )
    p.add_argument("--no-calibration", **no_calibration)
    add_config_options(p, INFERENCE_RUNTIME)
    p.set_defaults(func=predict)

    p = sub.add_parser(
        "pseudo-label",
        help="APDS pseudo-labels for unlabeled images from a teacher checkpoint",
        description="Score unlabeled images with a teacher, sharpen and select them by APDS, write a CSV "
        "for `elta train --pseudo-labels`. β and t are chosen on a labelled split, never on the pool.",
    )
    p.add_argument("--checkpoint", required=True, help="teacher checkpoint (file or run folder)")
    p.add_argument("--unlabeled", nargs="+", required=True, metavar="PATH", help=UNLABELED_HELP)
    p.add_argument(
        "--out", required=True, help="pseudo-label CSV; its summary goes to the same name with .json"
    )
    g = p.add_argument_group("calibration (default: the teacher's training dataset)")
    g.add_argument("--calibrate-data", help="labelled annotations to choose β, t on")
    g.add_argument("--calibrate-images", help="their image root")
    g.add_argument("--calibrate-format", default="auto", choices=FORMATS, help="their format (default auto)")
    g.add_argument("--calibrate-splits", help="folder with train.txt / val.txt / test.txt (AVA)")
    g.add_argument("--calibrate-split", default="val", help="split to calibrate on (default val)")
    add_apds_options(p)
    p.add_argument("--weight", type=float, default=1.0, help="loss weight written for every row (default 1)")
    add_config_options(p, INFERENCE_RUNTIME)
    p.set_defaults(func=pseudo_label)
