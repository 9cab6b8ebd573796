"""Dataset and setup commands: ``data check``, ``data cache``, ``demo-data``, ``demo``, ``import-checkpoint``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from elta.cli.options import DATA_SETTINGS, add_config_options, apply_options, progress
from elta.config import PAPER_BACKBONE, RunConfig

__all__ = ["add_commands"]


def data_check(args: argparse.Namespace) -> int:
    from elta.data.check import check_dataset, write_problems
    from elta.engine.prepare import read_dataset

    dataset = read_dataset(apply_options(RunConfig(), args))
    report = check_dataset(dataset, deep=not args.quick, progress=progress())
    print(report.format())
    if args.out and report.problems:
        print(f"problem list: {write_problems(report.problems, args.out)}")
    return 1 if report.problems else 0  # finished, but found problems


def data_cache(args: argparse.Namespace) -> int:
    from elta.data.cache import build_cache
    from elta.engine.prepare import read_dataset

    cfg = apply_options(RunConfig(), args)
    workers = cfg.runtime.workers if cfg.runtime.workers is not None else min(8, os.cpu_count() or 1)
    settings = {"size": args.size, "mode": args.mode, "quality": args.quality}
    summary = build_cache(read_dataset(cfg), args.out, progress=progress(), workers=workers, **settings)
    print(
        f"cached {summary['images']} images ({summary['written']} written, {summary['reused']} unchanged) "
        f"in {summary['cache']}: {summary['mode']} {summary['size']} px, {summary['bytes'] / 2**20:.1f} MiB"
    )
    if summary["bad"]:
        print(f"{summary['bad']} images could not be read: listed in {summary['bad_list']}")
    print(f"train or evaluate from it with --images {summary['cache']}")
    return 0


def demo_data(args: argparse.Namespace) -> int:
    from elta.data.demo import make_demo_dataset

    path = make_demo_dataset(
        args.out, n=args.n, seed=args.seed, progress=progress(), difficulty=args.difficulty
    )
    print(f"demo dataset: {path} ({args.n} images in {Path(args.out) / 'images'})")
    return 0


def demo(args: argparse.Namespace) -> int:
    from elta.workflows.demo import run_demo

    run_demo(args.out, progress=progress(), device=apply_options(RunConfig(), args).runtime.device)
    return 0


def import_checkpoint(args: argparse.Namespace) -> int:
    from elta.models.checkpoint import import_original_checkpoint

    model = {"head": args.head, "backbone": args.backbone, "image_size": args.image_size}
    out = import_original_checkpoint(args.source, args.out, **model)
    print(f"wrote {out}: use it with --checkpoint (predict, evaluate) or --init-from (train)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``data check``, ``data cache``, ``import-checkpoint``, ``demo-data`` and ``demo``."""
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="report bad rows and unreadable images, and the label statistics")
    add_config_options(p, DATA_SETTINGS)
    p.add_argument("--quick", action="store_true", help="only check that images exist and have a header")
    p.add_argument("--out", help="write the problem list to this CSV")
    p.set_defaults(func=data_check, command="data check")

    p = data.add_parser(
        "cache",
        help="decode and resize every image once into a folder that --images can point at",
        description="Decode every image of the dataset (all splits) once, resize it, and store it as a "
        "plain image under the same relative path in --out; train, evaluate or check with --images OUT.",
    )
    add_config_options(p, DATA_SETTINGS, {"runtime": ("workers",)})
    p.add_argument("--out", required=True, help="cache folder (new, empty, or an earlier cache to update)")
    p.add_argument(
        "--size", type=int, default=300, help="side length in px (default 300, the paper's resize)"
    )
    modes = "square: size×size like the training resize (default); short: shorter side = size, aspect kept"
    p.add_argument("--mode", choices=("square", "short"), default="square", help=modes)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the cached files (default 95)")
    p.set_defaults(func=data_cache, command="data cache")

    p = sub.add_parser("import-checkpoint", help="convert a checkpoint of the original ELTA release")
    p.add_argument("source", help="the original checkpoint (.pth with 'state_dict': vit.*, linear_emd.*, …)")
    p.add_argument("out", help="the elta checkpoint to write")
    heads = ("auto", "distribution", "scalar")
    which = "which of its heads was trained (auto: read from the optimizer state)"
    p.add_argument("--head", default="auto", choices=heads, help=which)
    p.add_argument("--backbone", default=PAPER_BACKBONE, help=f"timm model name (default {PAPER_BACKBONE})")
    p.add_argument("--image-size", type=int, default=256, help="input size in px (default 256)")
    p.set_defaults(func=import_checkpoint)

    p = sub.add_parser("demo-data", help="build the long-tailed demo dataset (AVA layout)")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=1500, help="number of images (default 1500)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--difficulty", default="standard", choices=("standard", "hard"),
        help="standard (default: pixels tell the score) or hard (AVA's regime: noisy votes, heavier tails, "
        "a taste no pixel shows)",
    )  # fmt: skip
    p.set_defaults(func=demo_data)

    p = sub.add_parser("demo", help="build demo data, train, evaluate and print the metrics")
    p.add_argument(
        "--out", default="elta-demo", help="folder for the data, run and evaluation (default elta-demo)"
    )
    add_config_options(p, {"runtime": ("device",)})
    p.set_defaults(func=demo)
