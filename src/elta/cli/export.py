"""``elta export``: a checkpoint as an ONNX or TorchScript file, checked against PyTorch."""

from __future__ import annotations

import argparse

__all__ = ["add_commands"]


def export(args: argparse.Namespace) -> int:
    from elta.workflows.export import describe, export_checkpoint

    result = export_checkpoint(
        args.checkpoint,
        args.out,
        format=args.format,
        opset=args.opset,
        dynamic_batch=args.dynamic_batch,
        image_size=args.image_size,
        calibrated=args.calibrated,
        quantize=args.quantize,
        quantize_method=args.quantize_method,
        quantize_images=args.quantize_images,
        quantize_count=args.quantize_count,
        images=args.images or (),
    )
    print(describe(result))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``export``."""
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX or TorchScript (score without PyTorch)",
        description="Export a checkpoint as a graph that takes RGB in [0, 1] [N, 3, S, S] and returns the "
        "score (calibration map baked in), the uncalibrated score and the bin probabilities. The export is "
        "checked against PyTorch on --images (else random inputs) and refused beyond 1e-4.",
    )
    p.add_argument("checkpoint", help="checkpoint file or run folder (elta's or the original release's)")
    p.add_argument("out", help="the file to write (.onnx, or .pt for TorchScript)")
    p.add_argument("--format", default="onnx", help="onnx (default) or torchscript")
    p.add_argument("--opset", type=int, default=18, metavar="N", help="ONNX opset (default 18)")
    p.add_argument(
        "--dynamic-batch", action="store_true", help="any batch size (default: a fixed batch of 1)"
    )
    p.add_argument("--image-size", type=int, metavar="S", help="input px (default: the training size)")
    calibration = p.add_mutually_exclusive_group()
    calibration.add_argument(
        "--calibrated",
        dest="calibrated",
        action="store_true",
        default=True,
        help="bake the checkpoint's calibration map into the score (the default)",
    )
    calibration.add_argument(
        "--no-calibration", dest="calibrated", action="store_false", help="export the model's own score"
    )
    p.add_argument("--quantize", help="int8: onnxruntime's INT8 quantisation (its metric cost: docs)")
    p.add_argument(
        "--quantize-method",
        default="static",
        help="static (default; calibrated on training images) or dynamic",
    )
    p.add_argument(
        "--quantize-images",
        nargs="+",
        metavar="PATH",
        help="images for static INT8 calibration (default: --quantize-count images of the training split)",
    )
    p.add_argument("--quantize-count", type=int, default=200, metavar="N", help="default 200")
    p.add_argument(
        "--images", nargs="+", metavar="PATH", help="images for the parity check (default: random inputs)"
    )
    p.set_defaults(func=export)
