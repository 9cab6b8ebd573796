"""Throughput and latency of ``elta serve`` with dynamic batching on and off, at 1, 8 and 32 concurrent clients.

Builds an elta checkpoint of an untrained ``tf_efficientnet_lite0`` (``weights="none"``: the timing does not
depend on the weights) and a few JPEGs (crops of scikit-image's photos) in a temporary directory, starts
``elta serve`` as a real uvicorn process on 127.0.0.1 twice, with batching on (``--max-batch 32 --max-wait-ms
10``) and off (``--max-batch 1``), and at each level of concurrency sends ``--requests`` requests of one photo
each from that many client threads (each with its own keep-alive connection), after a warm-up. Prints a table:
requests/s, p50 and p99 latency, and the mean batch size the service reported in /metrics; then the ratio of
throughput on/off at each level.

    python benchmarks/serve_load.py [--requests 160] [--clients 1 8 32] [--quick]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from common import machine, make_photos

from elta.models import build_model
from elta.models.checkpoint import save_checkpoint

BACKBONE = "tf_efficientnet_lite0"
MODES = {"on": ["--max-batch", "32", "--max-wait-ms", "10"], "off": ["--max-batch", "1"]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: Path, options: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    src = str(Path(__import__("elta").__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "elta",
        "-q",
        "serve",
        "--checkpoint",
        str(checkpoint),
        "--port",
        str(port),
    ]
    with open(log, "w") as out:
        process = subprocess.Popen([*command, "--device", "cpu", *options], stdout=out, stderr=out, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"elta serve exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise TimeoutError("elta serve did not start in 120 s")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def mean_batch(url: str) -> tuple[float, float]:
    """(images scored, forward passes) so far, from /metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values["elta_batch_images_total"], values["elta_batches_total"]


def load(url: str, photos: list[bytes], clients: int, requests: int) -> tuple[float, list[float]]:
    """Send ``requests`` one-photo requests from ``clients`` threads; (seconds, latencies)."""
    local = threading.local()

    def one(i: int) -> float:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120)
        started = time.perf_counter()
        response = local.client.post(
            f"{url}/v1/score", files=[("files", (f"{i}.jpg", photos[i % len(photos)]))]
        )
        if response.status_code != 200:
            raise RuntimeError(f"request {i}: {response.status_code} {response.text[:200]}")
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(requests)))
    return time.perf_counter() - started, latencies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=160, help="requests per level of concurrency")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="levels of concurrency")
    parser.add_argument("--photos", type=int, default=16, help="distinct test JPEGs (640×480)")
    parser.add_argument("--backbone", default=BACKBONE)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 8 requests, test_convnext at 48 px"
    )
    args = parser.parse_args()
    if args.quick:
        args.requests, args.clients, args.photos, args.backbone, args.image_size = (
            8,
            [1, 4],
            4,
            "test_convnext",
            48,
        )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(
            args.backbone, "distribution", list(range(1, 11)), [1, 10], image_size=args.image_size
        )
        checkpoint = save_checkpoint(tmp / "model.pt", model)
        (tmp / "photos").mkdir()
        photos = [p.read_bytes() for p, _ in make_photos(tmp / "photos", args.photos, (640, 480))]
        rows = {}
        for mode, options in MODES.items():
            process, url = start_server(checkpoint, options, tmp / f"serve-{mode}.log")
            try:
                load(url, photos, max(args.clients), max(args.clients) * 2)  # warm-up
                for clients in args.clients:
                    before = mean_batch(url)
                    seconds, latencies = load(url, photos, clients, args.requests)
                    after = mean_batch(url)
                    batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                    p50, p99 = np.quantile(latencies, [0.5, 0.99]) * 1000
                    rows[mode, clients] = (args.requests / seconds, p50, p99, batch)
            finally:
                stop_server(process)

    print(
        f"elta serve, {args.backbone} @ {args.image_size} px (untrained), one 640×480 JPEG per request, "
        f"{args.requests} requests per level; {machine(torch.device('cpu'))}\n"
    )
    print("| batching | clients | requests/s | p50 (ms) | p99 (ms) | mean batch |")
    print("|---|---|---|---|---|---|")
    for (mode, clients), (rate, p50, p99, batch) in rows.items():
        print(f"| {mode} | {clients} | {rate:.1f} | {p50:.0f} | {p99:.0f} | {batch:.1f} |")
    print()
    for clients in args.clients:
        ratio = rows["on", clients][0] / rows["off", clients][0]
        print(f"throughput batching on / off at {clients} clients: {ratio:.2f}×")


if __name__ == "__main__":
    main()
