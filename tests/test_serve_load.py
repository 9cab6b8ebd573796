"""`elta serve` as a real uvicorn process under concurrent clients: no errors, the batcher batches, and on SIGTERM
a request in flight still gets its answer."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest import tiny_config  # noqa: E402
from elta.engine.trainer import train  # noqa: E402
from serve_process import running_server  # noqa: E402

REQUESTS, CLIENTS = 400, 16


@pytest.fixture(scope="module")
def checkpoint(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("serve_load") / "run"
    train(tiny_config(demo_data), run)
    return run / "best.pt"


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    rows = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in rows}


def test_concurrent_clients_get_scores_without_errors_and_are_batched(checkpoint, demo_data, tmp_path):
    photos = [(p.name, p.read_bytes()) for p in sorted((demo_data / "images").glob("*.jpg"))[:20]]
    with running_server(checkpoint, tmp_path / "serve.log", "--max-batch", "16", "--max-wait-ms", "10") as (
        url,
        _,
    ):
        local = threading.local()

        def one(i: int) -> tuple[int, str, float | None]:
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=60)
            name, data = photos[i % len(photos)]
            response = local.client.post(f"{url}/v1/score", files=[("files", (name, data, "image/jpeg"))])
            image = response.json()["images"][0] if response.status_code == 200 else {}
            return response.status_code, name, image.get("score")

        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(one, range(REQUESTS), timeout=240))
        seconds = time.monotonic() - started
        metrics = _metrics(url)
    assert [status for status, _, _ in results] == [200] * REQUESTS
    by_name: dict[str, set[float]] = {}
    for _, name, score in results:
        by_name.setdefault(name, set()).add(round(score, 4))
    assert all(len(scores) == 1 for scores in by_name.values())  # a photo scores the same in any batch
    assert metrics["elta_images_total"] == REQUESTS and metrics["elta_image_errors_total"] == 0
    assert metrics["elta_batch_images_total"] == REQUESTS
    assert metrics['elta_requests_total{path="/v1/score",status="200"}'] == REQUESTS
    mean = metrics["elta_batch_size_mean"]
    print(f"{REQUESTS} requests from {CLIENTS} clients in {seconds:.1f} s; mean batch {mean:.2f}")
    assert mean > 1.0


def test_sigterm_lets_the_request_in_flight_finish(checkpoint, demo_data, tmp_path):
    photo = demo_data / "images" / "1.jpg"
    # a lone image waits 3 s for company in the batcher: SIGTERM arrives while it waits
    with running_server(checkpoint, tmp_path / "serve.log", "--max-wait-ms", "3000") as (url, process):
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                httpx.post, f"{url}/v1/score", files=[("files", ("1.jpg", photo.read_bytes()))], timeout=30
            )
            time.sleep(1.0)
            assert not pending.done()
            process.send_signal(signal.SIGTERM)
            response = pending.result(timeout=30)
        assert response.status_code == 200 and response.json()["images"][0]["score"] is not None
        # uvicorn shuts down in order, then re-raises the signal, as a process ended by SIGTERM should
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)
