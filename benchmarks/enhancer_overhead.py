"""Cost of the ELTA enhancers in a training step: baseline vs TFA + FLSA, same backbone and batch.

Runs the trainer's own step (``elta.engine.trainer.loss_terms`` + backward + Adam) on random images,
alternating baseline and enhanced steps so that both see the same machine state, and prints the ratio
of the median step times. Usage:

    python benchmarks/enhancer_overhead.py [--backbone tf_efficientnet_lite0] [--image-size 224]
        [--batch-size 48] [--steps 10] [--device auto]
"""

from __future__ import annotations

import statistics

from common import alternated, random_batch, script_parser
from train_step import step, variants

from elta.engine.runtime import resolve_device


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    # train_step.py's first two variants: float32 without and with TFA + FLSA, one model and optimizer
    fp32, fp32_tfa_flsa = variants(args.backbone, args.image_size, device, compile_=False)[:2]
    kinds = {"baseline": fp32, "tfa+flsa": fp32_tfa_flsa}
    batch = random_batch(args.batch_size, args.image_size, device)
    for v in kinds.values():  # warm-up
        step(v, batch)
    times = alternated(device, {name: lambda v=v: step(v, batch) for name, v in kinds.items()}, args.steps)
    base, enhanced = (statistics.median(times[name]) for name in kinds)
    print(
        f"backbone {args.backbone} @ {args.image_size}px, batch {args.batch_size}, device {device}, {args.steps} steps each"
    )
    print(f"median step: baseline {base * 1000:.1f} ms, tfa+flsa {enhanced * 1000:.1f} ms")
    print(f"ratio tfa+flsa / baseline: {enhanced / base:.4f}  ({(enhanced / base - 1) * 100:+.2f} %)")


if __name__ == "__main__":
    main()
