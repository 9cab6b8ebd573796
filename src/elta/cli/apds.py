"""The APDS selection options shared by ``pseudo-label`` and ``self-train``."""

from __future__ import annotations

import argparse

__all__ = ["add_apds_options", "float_list", "UNLABELED_HELP"]

UNLABELED_HELP = (
    "unlabeled images: files, folders (recursive), .txt/.lst lists, or CSVs whose image column is one of "
    "path, image_path, image, image_id, image_name, filename, file, name (relative to the CSV's folder)"
)
DEFAULT_BETAS = "1.0,1.1,1.2,1.25"
DEFAULT_THRESHOLDS = "0.70,0.75,0.80,0.85,0.90"


def float_list(text: str) -> tuple[float, ...]:
    """``"0.7,0.8"`` -> ``(0.7, 0.8)``; an argparse type."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, e.g. 0.7,0.8; got {text!r}"
        ) from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def add_apds_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("APDS selection")
    beta = "sharpening strength β (per AVA-equivalent score unit); with --threshold, skips the grid search"
    g.add_argument("--beta", type=float, help=beta)
    g.add_argument("--threshold", type=float, help="selection threshold t on max_k q_k (with --beta)")
    for flag, symbol, grid in (("--betas", "β", DEFAULT_BETAS), ("--thresholds", "t", DEFAULT_THRESHOLDS)):
        g.add_argument(
            flag, type=float_list, default=float_list(grid), help=f"{symbol} grid (default {grid})"
        )
    least = "smallest calibration selection a grid cell needs (default 5%% of the calibration set, ≥ 10)"
    g.add_argument("--min-selected", type=int, help=least)
