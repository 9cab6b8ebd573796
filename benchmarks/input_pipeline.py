"""Training input pipeline throughput: the original ELTA pipeline vs elta's, from large JPEGs and from the cache.

Builds a folder of large JPEGs (default 200 at 1024×768, crops of scikit-image's photos) and a generic CSV
over them, then times full passes of a DataLoader (batch 32) over the training transform of the paper
(square resize 300, random crop 256) with 0 and 2 worker processes:

  (a) original  PIL open → Resize((300, 300)) → RandomCrop(256) → ToTensor → Normalize (torchvision)
  (b) elta      AnnotationDataset from the original JPEGs, decoding without draft mode
  (c) elta      the same with JPEG draft decoding (load_image target = resize)
  (d) elta      AnnotationDataset from ``elta data cache`` (square 300 px, JPEG quality 95)

Each pass includes the worker start-up, as an epoch of training does. The main process uses one torch
thread (``--threads``), as DataLoader workers do: tensor ops on single images gain nothing from more, and
on a busy machine their thread hand-offs dominate. Both pipelines resize bilinearly (torchvision's default).
Prints images/s (best of ``--repeats`` passes, to keep other load on the machine out of the figure) and
ratios to (a). Usage:

    python benchmarks/input_pipeline.py [--images 200] [--repeats 3] [--workers 0 2] [--threads 1]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from common import add_photo_arguments, make_photos, script_parser
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from elta.data.annotations import read_annotations
from elta.data.cache import build_cache
from elta.data.dataset import AnnotationDataset, collate
from elta.data.images import load_image
from elta.data.transforms import ImageTransform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


SOURCES = (  # colour and non-colour photos: several sizes and JPEG contents
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
    "stereo_motorcycle",
)  # fmt: skip


class OriginalDataset(Dataset):
    """The original release's training input: PIL + torchvision transforms."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.transform = T.Compose(
            [T.Resize((300, 300)), T.RandomCrop(256), T.ToTensor(), T.Normalize(MEAN, STD)]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as img:
            return self.transform(img.convert("RGB"))


class FullDecodeDataset(AnnotationDataset):
    """elta's dataset with the full-size decode (no draft), to separate the two gains."""

    def _input(self, index: int, epoch: int) -> torch.Tensor:
        image = load_image(self.paths[index])
        return self.transform(image, index)


def images_per_second(dataset: Dataset, workers: int, repeats: int, ours: bool) -> float:
    best = 0.0
    for _ in range(repeats):
        loader = DataLoader(
            dataset, batch_size=32, num_workers=workers, collate_fn=collate if ours else None, shuffle=False
        )
        start = time.perf_counter()
        count = sum(len(batch) for batch in loader)
        best = max(best, count / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = script_parser(__doc__)
    add_photo_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="passes per setting; the best is reported")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        size = (args.width, args.height)
        made = make_photos(folder, args.images, size, sources=SOURCES, flip=True, scores=True)
        csv = folder / "scores.csv"  # image, mos
        csv.write_text("image,mos\n" + "".join(f"{path.name},{mos:.3f}\n" for path, mos in made))
        annotations = read_annotations(csv, "csv", folder)
        df = annotations.frame
        start = time.perf_counter()
        summary = build_cache(annotations, Path(tmp) / "cache", size=300, mode="square", quality=95)
        cache_s = time.perf_counter() - start
        cached = read_annotations(csv, "csv", Path(tmp) / "cache").frame
        source_mb = sum(p.stat().st_size for p in folder.glob("*.jpg")) / 2**20
        transform = ImageTransform(256, 300, MEAN, STD, interpolation="bilinear", train=True)
        variants = {
            "(a) original: PIL + torchvision": (OriginalDataset(df["path"].tolist()), False),
            "(b) elta, full decode": (FullDecodeDataset(df, transform), True),
            "(c) elta, JPEG draft decode": (AnnotationDataset(df, transform), True),
            "(d) elta, from the cache": (AnnotationDataset(cached, transform), True),
        }
        print(
            f"{args.images} JPEGs of {args.width}×{args.height} ({source_mb:.1f} MiB); cache of 300×300 "
            f"JPEGs q95: {summary['bytes'] / 2**20:.1f} MiB, built in {cache_s:.1f} s (1 process); "
            f"torch threads {torch.get_num_threads()}, best of {args.repeats} passes, batch 32"
        )
        print(f"| pipeline | {' | '.join(f'{w} workers: img/s (× a)' for w in args.workers)} |")
        print(f"|---|{'---|' * len(args.workers)}")
        rates = {
            name: [images_per_second(ds, w, args.repeats, ours) for w in args.workers]
            for name, (ds, ours) in variants.items()
        }
        base = rates["(a) original: PIL + torchvision"]
        for name, values in rates.items():
            cells = " | ".join(f"{v:.0f} ({v / b:.2f}×)" for v, b in zip(values, base, strict=True))
            print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
