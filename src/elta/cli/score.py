"""Commands that use a trained checkpoint: ``evaluate``, ``calibrate``, ``predict`` (and ``merge-scores``) and
``pseudo-label``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from elta import launch
from elta.cli.apds import UNLABELED_HELP, add_apds_options
from elta.cli.options import (
    DATA_SETTINGS,
    INFERENCE_RUNTIME,
    add_config_options,
    apply_options,
    build_runtime,
    given,
)
from elta.config import FORMATS, DataConfig, RunConfig, RuntimeConfig, flag_for
from elta.errors import ConfigError

__all__ = ["add_commands"]

log = logging.getLogger(__name__)


def _data_config(args: argparse.Namespace, saved: dict | None) -> RunConfig:
    """Data settings from the command line, falling back to the checkpoint's training data (``saved``)."""
    cfg = RunConfig()
    if given(args, "data", "data") is None:
        if not saved:
            raise ConfigError("--data is required (the checkpoint records no dataset)")
        cfg = dataclasses.replace(RunConfig.from_dict(saved), runtime=RuntimeConfig())  # where it runs: here
        log.info("no --data given: evaluating on the checkpoint's training dataset %s", cfg.data.data)
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
    from elta.calibration import format_calibration_report, format_selection
    from elta.models.checkpoint import load_checkpoint
    from elta.workflows.calibrate import calibrate_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    cfg = _data_config(args, checkpoint.config)
    runtime = build_runtime(cfg.runtime)
    result = calibrate_checkpoint(
        checkpoint, cfg, runtime, method=args.method, objective=args.objective, split=args.split, out=args.out
    )
    selection = result["selection"]
    if args.method == "auto":
        print(format_selection(selection) + "\n")
    title = f"{selection.chosen} calibration fitted on split '{args.split}' (same rows: SRCC cannot change)"
    print(format_calibration_report(result["report"], title=title))
    where = result["checkpoint"]
    if selection.calibration is None:
        print(f"\nno map serves the tails better than none: {where} now has no calibration map")
    else:
        print(f"\nstored in {where}: predict and evaluate apply it (--no-calibration to switch off)")
    return 0


def _open_predictor(args: argparse.Namespace, runtime):
    """The one place ``predict`` builds its scorer from the command line."""
    from elta.engine.predictor import Predictor

    return Predictor.from_checkpoint(
        args.checkpoint, runtime, calibrated=not args.no_calibration, backend=args.runtime
    )


def _worker_predictor(args: argparse.Namespace):
    """A scorer built where it runs (a Ray actor): the runtime resolved on that machine, no progress bars."""
    from elta.engine.runtime import Runtime

    cfg = apply_options(RunConfig(), args).runtime
    return _open_predictor(args, Runtime.from_config(cfg, progress=False))


COLLECTION_FLAGS = ("resume", "shard", "top", "bottom", "min_score", "copy_to", "column")


def predict(args: argparse.Namespace) -> int:
    from elta.engine.predictor import score_format

    if args.out:
        score_format(args.out)  # an unknown suffix fails before any scoring
    elif given_flags := [f for f in COLLECTION_FLAGS if getattr(args, f, None)] + (
        ["engine"] if args.engine != "local" else []
    ):
        raise ConfigError(f"{flag_for(given_flags[0])} needs --out (a scores file)")
    if args.out or launch.launched_by_torchrun():
        return _predict_collection(args)
    runtime = build_runtime(apply_options(RunConfig(), args).runtime)
    predictor = _open_predictor(args, runtime)
    frame = predictor.score(args.paths)
    unreadable = frame[frame["error"] != ""]
    print(frame.to_csv(index=False, float_format="%.4f"), end="")
    for _, row in unreadable.head(10).iterrows():
        print(f"  unreadable: {row['error']}", file=sys.stderr)
    return 0 if len(unreadable) < len(frame) else 1


def _selection(args: argparse.Namespace):
    from elta.workflows.collection import Selection

    top, bottom = (Selection.parse_fraction(v) if v else None for v in (args.top, args.bottom))
    return Selection(top=top, bottom=bottom, min_score=args.min_score, copy_to=args.copy_to, link=args.link)


def _runtime_config(args: argparse.Namespace) -> RuntimeConfig:
    """The runtime settings; under torchrun each process takes the GPU of its LOCAL_RANK."""
    cfg = apply_options(RunConfig(), args).runtime
    if launch.launched_by_torchrun() and cfg.device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            cfg = dataclasses.replace(cfg, device=f"cuda:{launch.local_rank()}")
    return cfg


def _predict_collection(args: argparse.Namespace) -> int:
    """``elta predict … --out FILE``: streamed, resumable, sharded or on Ray; then summary and selection."""
    import time

    from elta.data.sources import Collection
    from elta.errors import ImageLoadError
    from elta.workflows.collection import Shard, finish, merge_shards, score_collection, shard_output

    started = time.time()
    if not args.out:
        raise ConfigError("under torchrun, predict needs --out: each process writes its shard of the scores")
    selection = _selection(args)
    shard = Shard.parse(args.shard) if args.shard else Shard()
    if launch.launched_by_torchrun():
        if args.shard:
            raise ConfigError("--shard and torchrun: torchrun gives each process its shard; drop --shard")
        shard = Shard(launch.rank(), launch.world_size())
    collection = Collection(args.paths, args.column)
    if next(iter(collection), None) is None:
        raise ImageLoadError(", ".join(args.paths), "no image files here")
    runtime = build_runtime(_runtime_config(args))
    if args.engine == "ray":
        from functools import partial

        from elta.workflows.ray_scoring import score_with_ray

        if args.shard or args.resume:
            raise ConfigError("--engine ray schedules the whole collection itself: drop --shard and --resume")
        ray = {"address": args.address, "actors": args.actors, "gpus_per_actor": args.num_gpus_per_worker}
        scorer = partial(_worker_predictor, args)
        written = score_with_ray(scorer, collection, args.out, batch_size=runtime.batch_size, **ray)
        score_range = _open_predictor(args, runtime).score_range
    else:
        predictor = _open_predictor(args, runtime)
        score_range = predictor.score_range
        written = score_collection(
            predictor, collection, args.out, shard=shard, resume=args.resume,
            checkpoint=str(args.checkpoint), chunk_rows=args.part_rows, progress=runtime.progress,
        )  # fmt: skip
    if shard.count > 1:
        finish(written, score_range=score_range)
        if not (launch.launched_by_torchrun() and launch.rank() == 0):
            print(f"wrote shard {shard.index}/{shard.count} -> {written}")
            if not launch.launched_by_torchrun():
                print(
                    f"when all {shard.count} shards are done: elta merge-scores {args.out} --shards {shard.count}"
                )
            return 0
        shards = [shard_output(args.out, Shard(i, shard.count)) for i in range(shard.count)]
        log.info("waiting for the other processes' shards")
        while not all(p.is_file() and (args.resume or p.stat().st_mtime >= started - 1) for p in shards):
            time.sleep(1.0)
        written = merge_shards(args.out, shard.count)
    summary = finish(written, score_range=score_range, selection=selection, collection=collection)
    return _report_scores(summary)


def _report_scores(summary: dict) -> int:
    """Print :func:`~elta.workflows.collection.finish`'s summary; the exit status, 1 when nothing was scored."""
    print(f"scored {summary['scored']} images ({summary['failed']} unreadable) -> {summary['output']}")
    if summary["failures"]:
        print("  failures: " + ", ".join(f"{n} {kind}" for kind, n in summary["failures"].items()))
    if summary["percentiles"]:
        print("  percentiles: " + " ".join(f"{k} {v:.3f}" for k, v in summary["percentiles"].items()))
    chosen = summary.get("selection")
    if chosen:
        what = ", ".join(
            f"{k} {100 * v:g}%" if k in ("top", "bottom") else f"min-score {v:g}"
            for k, v in chosen.items()
            if k in ("top", "bottom", "min_score")
        )
        cut = f", cut {chosen['cut']:.4f}" if chosen["cut"] is not None else ""
        print(f"  selected {chosen['selected']} ({what}{cut}) -> {chosen['list']}")
        if chosen.get("folder"):
            print(f"  images {'linked' if chosen.get('link') else 'copied'} into {chosen['folder']}")
    stem = Path(summary["output"])
    print(f"  summary: {stem.with_name(stem.stem + '.summary.json')}", end="")
    print(f", histogram: {summary['histogram_png']}" if "histogram_png" in summary else "")
    for error in summary["failure_examples"]:
        print(f"  unreadable: {error}", file=sys.stderr)
    return 0 if summary["scored"] else 1


def merge_scores(args: argparse.Namespace) -> int:
    import json

    from elta.workflows.collection import Shard, finish, merge_shards, shard_output

    written = merge_shards(args.out, args.shards)
    summary_0 = shard_output(args.out, Shard(0, args.shards))
    saved = summary_0.with_name(summary_0.stem + ".summary.json")
    score_range = json.loads(saved.read_text()).get("score_range") if saved.is_file() else None
    return _report_scores(finish(written, score_range=score_range, selection=_selection(args)))


def pseudo_label(args: argparse.Namespace) -> int:
    from elta.workflows.pseudo import format_grid
    from elta.workflows.pseudo import pseudo_label as pseudo_label_run

    calibration = None
    if args.calibrate_data:
        data = {key: getattr(args, f"calibrate_{key}") for key in ("data", "images", "format", "splits")}
        calibration = RunConfig(data=DataConfig(**data))
    runtime = build_runtime(apply_options(RunConfig(), args).runtime)
    names = ("calibrate_split", "beta", "threshold", "betas", "thresholds", "min_selected", "weight")
    options = {name: getattr(args, name) for name in names}
    summary = pseudo_label_run(
        args.checkpoint, args.unlabeled, args.out, runtime, calibration=calibration, **options
    )
    if summary["grid"]:
        print(f"calibration grid (selected / MAE), {summary['chosen_by']}:\n{format_grid(summary['grid'])}")
    c = summary["counts"]
    print(
        f"pseudo-labelled {c['selected']} of {c['scored']} images (β={summary['beta']:g}, "
        f"t={summary['threshold']:g}, {summary['chosen_by']}) -> {summary['csv']}"
    )
    if c["labelled_skipped"]:
        print(f"left out {c['labelled_skipped']} images that are labelled in the calibration dataset")
    if c["unreadable"]:
        print(f"{c['unreadable']} unreadable images listed in {summary['unreadable_list']}")
    print(f"details: {Path(args.out).with_suffix('.json')}")
    return 0


def _add_selection_options(group) -> None:
    group.add_argument(
        "--top", metavar="P%", help="select the best P %% of the scored images (exact, e.g. 5%%)"
    )
    group.add_argument("--bottom", metavar="P%", help="select the worst P %% of the scored images")
    group.add_argument("--min-score", type=float, metavar="X", help="select images scoring at least X")
    group.add_argument("--copy-to", metavar="DIR", help="copy the selected images into DIR as RANK-NAME")
    group.add_argument("--link", action="store_true", help="with --copy-to: symbolic links instead of copies")


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
        default="auto",
        choices=("auto", "affine", "quantile", "isotonic"),
        help="auto (default): of no map, affine shrinks/stretches, quantile and isotonic, the one with the "
        "lowest cross-validated --objective, never worse than no map; or one map: affine stretch, quantile "
        "mapping onto the training labels, isotonic",
    )
    p.add_argument(
        "--objective",
        default="tail",
        choices=("tail", "bmae"),
        help="what auto minimises: tail (default), the mean of the low- and high-bucket MAE; or bmae, the "
        "balanced MAE",
    )
    p.add_argument(
        "--split", default="val", help="split whose predictions the map is fitted on (default val)"
    )
    p.add_argument(
        "--out", help="write the calibrated checkpoint here (default: update the checkpoint in place)"
    )
    add_config_options(p, DATA_SETTINGS, INFERENCE_RUNTIME)
    p.set_defaults(func=calibrate)

    p = sub.add_parser(
        "predict",
        help="score photos with a checkpoint (a few, or a collection of millions)",
        description="Score images. With --out the job streams: rows are written in parts as they come (memory "
        "stays flat), a killed run continues with --resume, --shard I/N (or torchrun) splits it across "
        "processes, --engine ray runs it on Ray Data; then a summary, a histogram (STEM.png) and the "
        "selection (--top / --bottom / --min-score).",
    )
    p.add_argument(
        "paths",
        nargs="+",
        help="image files, folders (recursive), path lists (.txt, .lst, .csv, .parquet) or WebDataset tar "
        "shards (.tar, .tar.gz; glob patterns such as 'shards/*.tar')",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file, run folder or exported .onnx")
    backends = "auto (default: .onnx on onnxruntime, a checkpoint on PyTorch), torch, or onnx"
    p.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnx"), help=backends)
    p.add_argument(
        "--out",
        help="scores file: .parquet (best for large jobs), .csv, .jsonl or .json (default: CSV on standard "
        "output, in memory)",
    )
    p.add_argument("--no-calibration", **no_calibration)
    g = p.add_argument_group("collections (with --out)")
    g.add_argument(
        "--column", help="the path column of .csv / .parquet lists (default: path, or the only one)"
    )
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its parts")
    g.add_argument(
        "--shard", metavar="I/N", help="score shard I of N (0-based; by key) into OUT's shard file"
    )
    g.add_argument(
        "--part-rows", type=int, default=4096, metavar="N",
        help="rows a part file holds: the most a killed run loses (default 4096)",
    )  # fmt: skip
    _add_selection_options(g)
    r = p.add_argument_group("Ray Data (pip install 'elta[ray]')")
    r.add_argument(
        "--engine", choices=("local", "ray"), default="local", help="where to score (default local)"
    )
    r.add_argument("--address", help="a Ray cluster's address (auto: this machine's); default: a local Ray")
    r.add_argument("--actors", type=int, default=2, metavar="N", help="scoring actors (default 2)")
    gpus = "GPUs each actor takes (default 0)"
    r.add_argument("--num-gpus-per-worker", type=float, default=0.0, metavar="G", help=gpus)
    add_config_options(p, INFERENCE_RUNTIME)
    p.set_defaults(func=predict)

    p = sub.add_parser(
        "merge-scores",
        help="join the shard files of `elta predict --shard I/N` into one scores file",
        description="Join OUT's shard files (STEM.shard-I-of-N.SUFFIX) in input order into OUT, then write "
        "the summary, the histogram and the selection as predict does.",
    )
    p.add_argument("out", help="the --out given to the shards' predict commands")
    p.add_argument("--shards", type=int, required=True, metavar="N", help="the number of shards")
    _add_selection_options(p.add_argument_group("selection"))
    p.set_defaults(func=merge_scores)

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
