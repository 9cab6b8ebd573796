"""Scoring speed and accuracy of exported models: PyTorch fp32 and bf16 against ONNX Runtime fp32 and INT8.

For each model (EfficientNet-Lite0: the demo checkpoint given with --checkpoint, else an untrained one at 192
px; a small SwinV2: timm's ``swinv2_tiny_window8_256`` at --swin-size px, untrained, no weights exist offline)
the script exports the checkpoint with ``elta export``'s code (ONNX fp32 with a dynamic batch, and ONNX INT8:
onnxruntime's static quantisation, calibrated on --calibration-images training images of the checkpoint's
dataset, or on the test photos for a model without one), then times ``Predictor.score(folder)`` (the code
path of ``elta predict``: JPEG decoding, resize, batching, the model) over a folder of --images JPEGs, for

  PyTorch eager fp32 · PyTorch bf16 autocast · ONNX Runtime fp32 · ONNX Runtime INT8

at each batch size of --batch-sizes, the variants taking turns on --chunks parts of the folder, the model loaded
before the clock starts. Prints
images/s and the ratio to PyTorch fp32. With --checkpoint it also scores that checkpoint's test split with
each variant and prints SRCC, PLCC and the tail MAEs, so the INT8 cost is measured, not assumed.

Usage:

    python benchmarks/export_speed.py --checkpoint elta-demo/run/best.pt [--images 200] [--batch-sizes 1 32]
        [--repeats 1] [--device cpu|cuda] [--swin-size 128] [--calibration-images 200] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import torch
from common import add_photo_arguments, machine, make_photos, timed

from elta.config import RunConfig
from elta.engine.evaluate import score_metrics, select_split
from elta.engine.onnx_model import OnnxModel
from elta.engine.precision import resolve_amp
from elta.engine.predictor import Predictor
from elta.engine.prepare import read_dataset
from elta.engine.runtime import Runtime, resolve_device
from elta.models import build_model
from elta.models.checkpoint import load_checkpoint, save_checkpoint
from elta.workflows.export import export_checkpoint

VARIANTS = ("PyTorch fp32", "PyTorch bf16", "ONNX Runtime fp32", "ONNX Runtime INT8")
METRICS = (("srcc", "SRCC"), ("plcc", "PLCC"), ("mae_low", "MAE low"), ("mae_medium", "MAE medium"),
           ("mae_high", "MAE high"))  # fmt: skip


def untrained(tmp: Path, name: str, backbone: str, size: int) -> Path:
    torch.manual_seed(0)
    model = build_model(
        backbone, "distribution", list(range(1, 11)), [1, 10], image_size=size, weights="none"
    )
    return save_checkpoint(tmp / f"{name}.pt", model)


def exports(checkpoint: Path, tmp: Path, photos: list[Path], calibration_images: int) -> dict[str, Path]:
    """The ONNX fp32 and INT8 files of ``checkpoint`` (INT8 calibrated on its training split, else on photos)."""
    has_data = load_checkpoint(checkpoint).config is not None
    fp32, int8 = tmp / f"{checkpoint.stem}.onnx", tmp / f"{checkpoint.stem}.int8.onnx"
    result = export_checkpoint(checkpoint, fp32, dynamic_batch=True, images=photos[:4])
    print(f"  {checkpoint.stem}: {result.exporter}; parity {max(result.deviation.values()):.2g}")
    result = export_checkpoint(
        checkpoint, int8, dynamic_batch=True, images=photos[:4], quantize="int8",
        quantize_images=None if has_data else photos[:calibration_images], quantize_count=calibration_images,
    )  # fmt: skip
    calibrated_on = f"{calibration_images} training images" if has_data else f"{calibration_images} photos"
    print(f"  {checkpoint.stem} INT8 (static, {calibrated_on}): max |score − fp32| on 4 photos "
          f"{result.deviation['score']:.3f}")  # fmt: skip
    return {"fp32": fp32, "int8": int8}


def predictors(
    checkpoint: Path, files: dict[str, Path], device, batch: int, bf16: bool, threads: int = 0
) -> dict[str, Predictor]:
    plain = Runtime.create(device, amp="off", batch_size=batch)
    found = {"PyTorch fp32": Predictor.from_checkpoint(checkpoint, plain)}
    if bf16:
        found["PyTorch bf16"] = Predictor.from_checkpoint(
            checkpoint, Runtime.create(device, amp="bf16", batch_size=batch)
        )
    found["ONNX Runtime fp32"] = Predictor(OnnxModel.from_file(files["fp32"], device, threads), plain)
    found["ONNX Runtime INT8"] = Predictor(OnnxModel.from_file(files["int8"], device, threads), plain)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_photo_arguments(parser)
    parser.add_argument("--checkpoint", help="the demo model (elta-demo/run/best.pt): Lite0 and the metrics")
    parser.add_argument("--swin-size", type=int, default=128, help="SwinV2's input px (default 128)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per variant (the median counts)")
    parser.add_argument("--chunks", type=int, default=5, help="parts of the folder the variants alternate on")
    parser.add_argument("--calibration-images", type=int, default=200, help="static INT8 calibration set")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-bf16", action="store_true", help="leave out PyTorch bf16")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads of PyTorch and ONNX Runtime alike (0: their defaults)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny test models (tests of this script)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        resolve_amp("bf16", device)
        bf16 = not args.no_bf16
    except ValueError as exc:
        print(f"bf16 left out: {exc}")
        bf16 = False

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "photos"
        folder.mkdir()
        photos = [path for path, _ in make_photos(folder, args.images, (args.width, args.height))]
        if args.quick:
            models = {"test_convnext @48": untrained(tmp, "convnext", "test_convnext", 48)}
        else:
            lite0 = (
                Path(args.checkpoint)
                if args.checkpoint
                else untrained(tmp, "lite0", "tf_efficientnet_lite0", 192)
            )
            models = {
                f"Lite0 @{load_checkpoint(lite0).spec.image_size}{' (demo model)' if args.checkpoint else ''}": lite0,
                f"SwinV2-T @{args.swin_size}": untrained(tmp, "swinv2", "swinv2_tiny_window8_256", args.swin_size),
            }  # fmt: skip
        threads = f"{args.threads} thread(s) for both runtimes" if args.threads else "default threads"
        print(
            f"{args.images} JPEGs of {args.width}×{args.height}; {machine(device)}; device {device}; {threads}"
        )
        print("exporting …")
        files = {name: exports(ckpt, tmp, photos, args.calibration_images) for name, ckpt in models.items()}

        rows = []
        for name, ckpt in models.items():
            for batch in args.batch_sizes:
                scorers = predictors(ckpt, files[name], device, batch, bf16, args.threads)
                for scorer in scorers.values():  # warm-up: allocations, kernels, file cache
                    scorer.score(photos[: 2 * batch])
                # The folder in --chunks parts, the variants in turn on each part (rotating who goes first),
                # so that load from other processes on a shared machine falls on all variants alike.
                times = {variant: [0.0] * args.repeats for variant in scorers}
                names = list(scorers)
                parts = [photos[i :: args.chunks] for i in range(min(args.chunks, len(photos)))]
                for r in range(args.repeats):
                    for p, part in enumerate(parts):
                        k = (r * len(parts) + p) % len(names)
                        for variant in names[k:] + names[:k]:
                            times[variant][r] += timed(device, lambda s=scorers[variant], x=part: s.score(x))
                base = args.images / statistics.median(times["PyTorch fp32"])
                for variant in names:
                    rate = args.images / statistics.median(times[variant])
                    rows.append(f"| {name} | {batch} | {variant} | {rate:.1f} | {rate / base:.2f}× |")
        print(
            f"\nimages/s scoring {args.images} JPEGs with Predictor.score (variants alternated on "
            f"{args.chunks} parts; median of {args.repeats} passes)\n"
        )
        print("| model | batch | runtime | img/s | × PyTorch fp32 |")
        print("|---|---|---|---|---|")
        print("\n".join(rows))

        if not args.checkpoint or args.quick:
            return
        checkpoint = load_checkpoint(args.checkpoint)
        frame = select_split(read_dataset(RunConfig.from_dict(checkpoint.config)).frame, "test")
        name = next(iter(models))
        scorers = predictors(Path(args.checkpoint), files[name], device, 32, bf16, args.threads)
        print(f"\n{name}: its test split ({len(frame)} images), each runtime\n")
        print("| runtime | " + " | ".join(label for _, label in METRICS) + " |")
        print("|---" * (len(METRICS) + 1) + "|")
        for variant, scorer in scorers.items():
            metrics = score_metrics(frame, scorer.predict_frame(frame), scorer.spec)
            print(f"| {variant} | " + " | ".join(f"{metrics[key]:.4f}" for key, _ in METRICS) + " |")


if __name__ == "__main__":
    main()
