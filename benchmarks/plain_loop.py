"""The reference a fine-tuning recipe must beat: a plain PyTorch loop, to compare with ``elta train``.

The loop a practitioner writes in twenty lines: the same backbone (with elta's ImageNet weights), a linear head
to the 10 rating bins with the EMD loss of elta's distribution head, Adam with lr 1e-4 for the backbone and 1e-3
for the head, constant, random horizontal flips, the whole image resized (no crop), BatchNorm in train mode.
It reads an AVA-layout dataset (``AVA.txt`` + ``train.txt`` / ``test.txt``), trains on the train split and
prints the test split's SRCC, PLCC and tail MAEs with ``elta.metrics.evaluate`` — the numbers
``elta evaluate --split test`` prints for an ``elta train`` run on the same data.

    python benchmarks/plain_loop.py --data elta-demo/data [--epochs 4] [--batch-size 32] [--image-size 192]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from elta.functional import emd_loss
from elta.metrics import evaluate
from elta.models.backbones import backbone_data_config, create_backbone

CENTERS = torch.arange(1, 11, dtype=torch.float32)


def read_split(root: Path, split: str) -> tuple[list[Path], torch.Tensor]:
    """Image paths and vote distributions [N, 10] of one split of an AVA-layout folder."""
    rows = {
        int(r[1]): np.array(r[2:12], dtype=np.float64)
        for r in (ln.split() for ln in (root / "AVA.txt").open())
    }
    ids = [int(i) for i in (root / f"{split}.txt").read_text().split()]
    votes = np.stack([rows[i] for i in ids])
    return [root / "images" / f"{i}.jpg" for i in ids], torch.tensor(
        votes / votes.sum(1, keepdims=True)
    ).float()


def load(paths, size: int, mean, std, flip: torch.Tensor | None = None) -> torch.Tensor:
    images = []
    for k, path in enumerate(paths):
        image = TF.resize(TF.to_tensor(Image.open(path).convert("RGB")), [size, size], antialias=True)
        images.append(TF.hflip(image) if flip is not None and flip[k] else image)
    return TF.normalize(torch.stack(images), mean, std)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="AVA-layout folder (elta demo-data writes one)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", choices=("imagenet", "none"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    root = Path(args.data)
    backbone = create_backbone(args.backbone, weights=args.weights)
    norm = backbone_data_config(backbone)
    head = torch.nn.Linear(backbone.num_features, 10)
    optimizer = torch.optim.Adam([{"params": backbone.parameters(), "lr": 1e-4}, {"params": head.parameters()}],
                                 lr=1e-3)  # fmt: skip
    paths, targets = read_split(root, "train")
    started = time.perf_counter()
    for epoch in range(args.epochs):
        backbone.train()
        order = torch.randperm(len(paths))
        for start in range(0, len(paths), args.batch_size):
            rows = order[start : start + args.batch_size]
            flips = torch.rand(len(rows)) < 0.5
            images = load([paths[i] for i in rows], args.image_size, norm["mean"], norm["std"], flips)
            loss = emd_loss(head(backbone(images)).softmax(1), targets[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: last batch EMD {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    test_paths, test_targets = read_split(root, "test")
    backbone.eval()
    with torch.no_grad():
        probs = torch.cat([head(backbone(load(test_paths[i : i + 64], args.image_size, norm["mean"], norm["std"])))
                           .softmax(1) for i in range(0, len(test_paths), 64)])  # fmt: skip
    m = evaluate(
        (probs * CENTERS).sum(1).numpy(), (test_targets * CENTERS).sum(1).numpy(), score_range=(1, 10)
    )
    print(f"plain loop, {args.backbone} @ {args.image_size} px, {args.epochs} epochs, batch {args.batch_size}, "
          f"seed {args.seed}, test split of {root}:")  # fmt: skip
    print(" | ".join(f"{k} {m[k]:.4f}" for k in ("srcc", "plcc", "mae", "mae_low", "mae_medium", "mae_high")))


if __name__ == "__main__":
    main()
