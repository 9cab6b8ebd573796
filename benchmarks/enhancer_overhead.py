"""Cost of the ELTA enhancers in a training step: baseline vs TFA + FLSA, same backbone and batch.

Runs the trainer's own step (``elta.engine.trainer.loss_terms`` + backward + Adam) on random images,
alternating baseline and enhanced steps so that both see the same machine state, and prints the ratio
of the median step times. Usage:

    python benchmarks/enhancer_overhead.py [--backbone tf_efficientnet_lite0] [--image-size 224]
        [--batch-size 48] [--steps 10] [--device auto]
"""

from __future__ import annotations

import statistics

import torch
from common import alternated, ava_model, random_batch, script_parser

from elta.engine.runtime import resolve_device
from elta.engine.trainer import loss_terms
from elta.enhancers import build_enhancers


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = ava_model(args.backbone, args.image_size)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    kinds = {
        "baseline": build_enhancers([]),
        "tfa+flsa": build_enhancers([{"name": "tfa"}, {"name": "flsa", "weight": 1.0}]).to(device),
    }
    batch = random_batch(args.batch_size, args.image_size, device)

    def step(enhancers) -> None:
        terms = loss_terms(model, enhancers, model.forward_features(batch.images), batch)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()

    for enhancers in kinds.values():  # warm-up
        step(enhancers)
    times = alternated(device, {name: lambda e=e: step(e) for name, e in kinds.items()}, args.steps)
    base = statistics.median(times["baseline"])
    enhanced = statistics.median(times["tfa+flsa"])
    print(
        f"backbone {args.backbone} @ {args.image_size}px, batch {args.batch_size}, device {device}, {args.steps} steps each"
    )
    print(f"median step: baseline {base * 1000:.1f} ms, tfa+flsa {enhanced * 1000:.1f} ms")
    print(f"ratio tfa+flsa / baseline: {enhanced / base:.4f}  ({(enhanced / base - 1) * 100:+.2f} %)")


if __name__ == "__main__":
    main()
