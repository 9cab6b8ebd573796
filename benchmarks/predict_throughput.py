"""Scoring throughput: ``elta predict``'s code path vs the original release's plain loop, same checkpoint.

Builds a folder of large JPEGs (default 200 at 1024×768, crops of scikit-image's photos) and an elta
checkpoint of an untrained ``tf_efficientnet_lite0`` (``weights="none"``: the timing does not depend on the
weights) in a temporary directory, then times full passes over the folder, alternating the variants:

  (a) original   a plain loop, batch by batch, no workers: PIL open → Resize((S, S)) (torchvision's
                 default, bilinear) → ToTensor → Normalize → model forward, S = the model's input size
  (b) elta       ``Predictor(...).score(folder)``, the code path of ``elta predict`` (JPEG draft decoding,
                 DataLoader with elta's default workers, float32)
  (c) elta bf16  the same with ``--amp bf16`` (skipped where bf16 is unsupported, or with --no-bf16)
  (–) forward    the model alone on the same images, already decoded and resized in memory (the bound)

Both score with the same weights at batch ``--batch-size``; the model is loaded before the clock starts.
Prints images/s (median of ``--repeats`` passes) and ratios to (a), then the wall time of the command
``python -m elta predict FOLDER --checkpoint CKPT --out scores.csv`` in a fresh process (start-up, imports
and model loading included), and of the same command on a single image, which is about the start-up alone.
Usage:

    python benchmarks/predict_throughput.py [--images 200] [--repeats 3] [--batch-size 32]
        [--device auto] [--no-bf16] [--no-cli]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from common import add_photo_arguments, alternated, ava_model, make_photos, script_parser
from PIL import Image
from torchvision import transforms as T

from elta.engine.precision import resolve_amp
from elta.engine.predictor import Predictor
from elta.engine.runtime import Runtime, resolve_device
from elta.models.checkpoint import save_checkpoint

BACKBONE = "tf_efficientnet_lite0"


def _batches(paths: list[Path], batch_size: int, transform) -> Iterator[torch.Tensor]:
    """The images at ``paths`` through ``transform``, stacked into batches of ``batch_size``."""
    for i in range(0, len(paths), batch_size):
        images = []
        for path in paths[i : i + batch_size]:
            with Image.open(path) as img:
                images.append(transform(img.convert("RGB")))
        yield torch.stack(images)


@torch.no_grad()
def original_loop(model, paths: list[Path], batch_size: int, device: torch.device) -> np.ndarray:
    """The original release's way: PIL + torchvision transforms in the main process, then the model."""
    spec = model.spec
    size = (spec.image_size, spec.image_size)
    transform = T.Compose([T.Resize(size), T.ToTensor(), T.Normalize(tuple(spec.mean), tuple(spec.std))])
    batches = _batches(paths, batch_size, transform)
    return torch.cat([model(images.to(device)).score.cpu() for images in batches]).numpy()


@torch.no_grad()
def _forward(model, batches: list[torch.Tensor], device: torch.device) -> None:
    for batch in batches:
        model(batch.to(device)).score.cpu()


def cli_seconds(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "elta", *args], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = script_parser(__doc__)
    add_photo_arguments(parser)
    parser.add_argument("--image-size", type=int, default=224, help="the model's input px")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="passes per variant; the median is reported")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-bf16", action="store_true", help="leave out the bf16 variant")
    parser.add_argument("--no-cli", action="store_true", help="leave out the `elta predict` wall times")
    args = parser.parse_args()
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        paths = [path for path, _ in make_photos(folder, args.images, (args.width, args.height))]
        source_mb = sum(p.stat().st_size for p in paths) / 2**20
        torch.manual_seed(0)
        model = ava_model(BACKBONE, args.image_size)
        checkpoint = save_checkpoint(Path(tmp) / "model.pt", model)
        scorer = Predictor.from_checkpoint(
            checkpoint, Runtime.create(device, amp="off", batch_size=args.batch_size)
        )
        reference = scorer.model  # the same weights, loaded the same way, for the original loop
        loop = partial(original_loop, reference, paths, args.batch_size, device)
        variants = {"(a) original: PIL + torchvision loop": loop}
        variants["(b) elta predict (Predictor), fp32"] = partial(scorer.score, folder)
        try:
            resolve_amp("bf16", device)
            bf16_error = ""
        except ValueError as exc:
            bf16_error = str(exc)
        if not args.no_bf16 and not bf16_error:
            runtime_bf16 = Runtime.create(device, amp="bf16", batch_size=args.batch_size)
            scorer_bf16 = Predictor.from_checkpoint(checkpoint, runtime_bf16)
            variants["(c) elta predict (Predictor), --amp bf16"] = lambda: scorer_bf16.score(folder)
        size = (reference.spec.image_size,) * 2
        preloaded = list(_batches(paths, args.batch_size, T.Compose([T.Resize(size), T.ToTensor()])))
        alone = "(–) model forward alone, fp32, images already in memory"
        variants[alone] = lambda: _forward(reference, preloaded, device)

        # same results: the elta path and the loop must agree up to the resize (bicubic + draft vs bilinear)
        a = original_loop(reference, paths[: args.batch_size], args.batch_size, device)
        b = scorer.score(paths[: args.batch_size])["score"].to_numpy()
        max_diff = float(np.abs(a - b).max())

        for fn in variants.values():  # warm-up: one full pass each (allocations, kernels, file cache)
            fn()
        times = alternated(device, variants, args.repeats)
        names = list(variants)

        print(
            f"{args.images} JPEGs of {args.width}×{args.height} ({source_mb:.1f} MiB), {BACKBONE} "
            f"@ {args.image_size} px, batch {args.batch_size}, device {device}, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs; "
            f"median of {args.repeats} alternated passes"
        )
        if bf16_error and not args.no_bf16:
            print(f"bf16 left out: {bf16_error}")
        print(f"max |score (a) − score (b)| on the first batch: {max_diff:.4f}\n")
        print("| pipeline | img/s | × (a) | passes (s) |")
        print("|---|---|---|---|")
        base = args.images / statistics.median(times[names[0]])
        for name in names:
            rate = args.images / statistics.median(times[name])
            passes = ", ".join(f"{t:.2f}" for t in times[name])
            print(f"| {name} | {rate:.1f} | {rate / base:.2f}× | {passes} |")

        if args.no_cli:
            return
        env = dict(os.environ)
        src = str(Path(__import__("elta").__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH", "")]))
        common = ["--checkpoint", str(checkpoint), "--device", str(device)]
        common += ["--batch-size", str(args.batch_size)]
        one = cli_seconds(["predict", str(paths[0]), *common, "--out", str(Path(tmp) / "one.csv")], env)
        full = [
            cli_seconds(["predict", str(folder), *common, "--out", str(Path(tmp) / "scores.csv")], env)
            for _ in range(2)
        ]
        scored = len((Path(tmp) / "scores.csv").read_text().splitlines()) - 1
        print(
            f"\n`python -m elta predict` in a fresh process: {scored} images in "
            f"{' s, '.join(f'{t:.1f}' for t in full)} s ({args.images / min(full):.1f} img/s end to end, "
            f"best of 2); a single image: {one:.1f} s (start-up, imports, model loading)"
        )


if __name__ == "__main__":
    main()
