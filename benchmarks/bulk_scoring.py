"""Collection scoring: images/s and peak memory of ``elta predict``'s ways to score a folder, end to end.

Makes ``--images`` JPEGs (crops of scikit-image's photos, ``--width``×``--height``) and an elta checkpoint of an
untrained ``--backbone`` (default ``tf_efficientnet_lite0`` at 224 px; ``weights="none"``: the timing does not
depend on the weights), then runs each variant as fresh commands, one after the other:

  (a) in memory   ``elta predict FOLDER`` (scores printed as CSV: every path listed up front, every
                  prediction held until the end; the code path before streaming)
  (b) streamed    ``elta predict FOLDER --out scores.parquet`` (parts written as scored, then joined)
  (c) 2 shards    ``elta predict … --shard 0/2`` and ``--shard 1/2`` at once, then ``elta merge-scores``
  (d) Ray         ``elta predict … --engine ray --actors 2`` (a local Ray started for the job)

Each is timed end to end (start-up, imports and model loading included) and its peak memory is the largest sum
of the resident memory (RSS) of the command's process tree (loader processes, shards, Ray's processes), sampled
every 50 ms. The same variants run on ``--small`` images to show whether memory grows with the collection.
Usage:

    python benchmarks/bulk_scoring.py [--images 5000] [--small 500] [--batch-size 32] [--no-ray] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import add_photo_arguments, machine, make_photos

from elta.models import build_model
from elta.models.checkpoint import save_checkpoint


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += parents.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def run_commands(commands: list[list[str]], env: dict) -> tuple[float, int]:
    """Run ``commands`` at once (each ``python -m elta …``); (wall seconds, peak summed RSS in bytes)."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "elta", *c], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )  # fmt: skip
        for c in commands
    ]
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(_tree_rss(p.pid) for p in procs))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    errors = [p.communicate()[1] for p in procs]
    done.set()
    sampler.join()
    for proc, err in zip(procs, errors, strict=True):
        if proc.returncode != 0:
            raise SystemExit(f"command failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    return time.perf_counter() - start, peak


def variants(folder: Path, out: Path, common: list[str], ray: bool) -> dict[str, list[list[list[str]]]]:
    """name -> steps; each step is commands run at once."""
    runs = {
        "(a) in memory: elta predict FOLDER (CSV on stdout)": [[["predict", str(folder), *common]]],
        "(b) streamed: --out scores.parquet": [[["predict", str(folder), "--out", str(out), *common]]],
        "(c) --shard 0/2 + 1/2 at once, then merge-scores": [
            [["predict", str(folder), "--out", str(out), "--shard", f"{i}/2", *common] for i in range(2)],
            [["merge-scores", str(out), "--shards", "2"]],
        ],
    }
    if ray:
        runs["(d) --engine ray --actors 2 (local Ray)"] = [
            [["predict", str(folder), "--out", str(out), "--engine", "ray", "--actors", "2", *common]]
        ]
    return runs


def measure(folder: Path, out_dir: Path, common: list[str], ray: bool, env: dict) -> dict[str, tuple]:
    results = {}
    for name, steps in variants(folder, out_dir / "scores.parquet", common, ray).items():
        for stale in out_dir.glob("scores*"):
            stale.unlink()
        wall, peak = 0.0, 0
        for commands in steps:
            seconds, rss = run_commands(commands, env)
            wall, peak = wall + seconds, max(peak, rss)
        results[name] = (wall, peak)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_photo_arguments(parser)
    parser.set_defaults(images=5000, width=512, height=384)
    parser.add_argument("--small", type=int, default=500, help="images of the small run (memory comparison)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224, help="the model's input px")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-ray", action="store_true", help="leave out the Ray variant")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 24 and 8 images, test_convnext, 48 px"
    )
    args = parser.parse_args()
    if args.quick:
        args.images, args.small, args.backbone, args.image_size = 24, 8, "test_convnext", 48
        args.width, args.height = 96, 72
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print(machine(torch.device("cpu")))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big, small = tmp / "big", tmp / "small"
        big.mkdir()
        small.mkdir()
        make_photos(big, args.images, (args.width, args.height))
        for path in sorted(big.glob("*.jpg"))[: args.small]:
            os.link(path, small / path.name)
        torch.manual_seed(0)
        model = build_model(args.backbone, "distribution", list(range(1, 11)), [1, 10],
                            image_size=args.image_size, weights="none")  # fmt: skip
        checkpoint = save_checkpoint(tmp / "model.pt", model)
        common = [
            "--checkpoint",
            str(checkpoint),
            "--device",
            "cpu",
            "--batch-size",
            str(args.batch_size),
            "-q",
        ]
        out_dir = tmp / "out"
        out_dir.mkdir()
        print(f"{args.images} JPEGs of {args.width}×{args.height}, {args.backbone} at {args.image_size} px, "
              f"batch {args.batch_size}; memory also on {args.small} images")  # fmt: skip
        at_small = measure(small, out_dir, common, not args.no_ray, env)
        at_big = measure(big, out_dir, common, not args.no_ray, env)
    base = args.images / at_big[next(iter(at_big))][0]
    print(f"\n| variant | img/s ({args.images} images, end to end) | × (a) | peak RSS, {args.small} images "
          f"| peak RSS, {args.images} images |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, (wall, peak) in at_big.items():
        rate = args.images / wall
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}× | {at_small[name][1] / 2**20:.0f} MiB "
              f"| {peak / 2**20:.0f} MiB |")  # fmt: skip


if __name__ == "__main__":
    main()
