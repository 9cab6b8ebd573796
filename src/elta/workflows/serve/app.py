"""The scoring service: a FastAPI app around one :class:`~elta.engine.predictor.Predictor`.

``POST /v1/score`` takes photos as multipart uploads (never a path on the server's disk), decodes them in worker
threads with the project's safe image loader, scores them through the dynamic :class:`Batcher` and returns per
photo the score, its spread, the vote distribution, the uncalibrated score (when the checkpoint has a calibration
map), the percentile of the score among the training labels, and the reason for a photo that could not be read.
``GET /v1/model`` describes the model, ``GET /healthz`` answers while the app serves, ``GET /metrics`` counts in
Prometheus' text format, and ``/`` is the page (plain HTML and JS, nothing fetched from elsewhere).

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations, whose types are imported
inside :func:`create_app`.
"""

import asyncio
import contextlib
import hmac
import math
import os
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Annotated

import numpy as np
from PIL import Image

import elta
from elta.data.images import DEFAULT_MAX_PIXELS, load_image
from elta.engine.predictor import Predictions, Predictor
from elta.errors import ConfigError, ImageLoadError, UnavailableError
from elta.workflows.serve.batcher import Batcher

__all__ = ["ServeSettings", "ServiceMetrics", "create_app", "model_info", "serve"]

MB = 1024 * 1024
MULTIPART_OVERHEAD = MB  # headers and boundaries around the files of one request
HISTOGRAM_BINS = 36  # bars of the training-score histogram over the score range
LATENCY_WINDOW = 2048  # latency quantiles are over this many most recent requests


@dataclass(frozen=True)
class ServeSettings:
    """How the service batches, what it accepts, and who may call it."""

    max_batch: int = 32  # images scored in one forward pass at most
    max_wait_ms: float = 10.0  # how long the first image of a batch waits for others
    max_upload_mb: float = 20.0  # per uploaded file
    max_files: int = 32  # per request
    max_pixels: int = DEFAULT_MAX_PIXELS  # per image (width × height), checked before decoding
    decode_threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))  # images decoded at once
    token: str | None = None  # when set, the API needs "Authorization: Bearer TOKEN"

    def __post_init__(self) -> None:
        checks = {
            "--max-batch": (self.max_batch >= 1, "≥ 1"),
            "--max-wait-ms": (self.max_wait_ms >= 0, "≥ 0"),
            "--max-upload-mb": (self.max_upload_mb > 0, "> 0"),
            "--max-files": (self.max_files >= 1, "≥ 1"),
            "max_pixels": (self.max_pixels >= 1, "≥ 1"),
            "decode_threads": (self.decode_threads >= 1, "≥ 1"),
        }
        for flag, (ok, bound) in checks.items():
            if not ok:
                raise ConfigError(f"{flag} must be {bound}; got {getattr(self, _field(flag))}")
        if self.token is not None and not self.token.strip():
            raise ConfigError("--token must not be empty")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_files * self.max_upload_mb * MB) + MULTIPART_OVERHEAD


def _field(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


class ServiceMetrics:
    """Counters of the running service, written as Prometheus text (all on the event loop's thread)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (path, status) -> requests
        self.latency: dict[str, deque[float]] = {}  # path -> the latest request latencies, seconds
        self.images = 0  # images received by /v1/score
        self.image_errors = 0  # of those, unreadable
        self.batch_sizes: Counter[int] = Counter()  # images per forward pass -> passes
        self.batch_seconds = 0.0

    def request(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] += 1
        self.latency.setdefault(path, deque(maxlen=LATENCY_WINDOW)).append(seconds)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_sizes[size] += 1
        self.batch_seconds += seconds

    @property
    def mean_batch_size(self) -> float:
        batches = sum(self.batch_sizes.values())
        return sum(n * c for n, c in self.batch_sizes.items()) / batches if batches else 0.0

    def text(self) -> str:
        lines = [
            "# HELP elta_requests_total HTTP requests by path and status.",
            "# TYPE elta_requests_total counter",
        ]
        for (path, status), n in sorted(self.requests.items()):
            lines.append(f'elta_requests_total{{path="{path}",status="{status}"}} {n}')
        lines += [
            "# HELP elta_request_latency_seconds Request latency quantiles over the latest requests, by path.",
            "# TYPE elta_request_latency_seconds summary",
        ]
        for path, values in sorted(self.latency.items()):
            for q in (0.5, 0.9, 0.99):
                lines.append(
                    f'elta_request_latency_seconds{{path="{path}",quantile="{q}"}} {np.quantile(values, q):.6f}'
                )
            lines.append(f'elta_request_latency_seconds_count{{path="{path}"}} {len(values)}')
        batches = sum(self.batch_sizes.values())
        scored = sum(n * c for n, c in self.batch_sizes.items())
        lines += [
            "# HELP elta_images_total Images received for scoring.",
            "# TYPE elta_images_total counter",
            f"elta_images_total {self.images}",
            "# HELP elta_image_errors_total Images that could not be read.",
            "# TYPE elta_image_errors_total counter",
            f"elta_image_errors_total {self.image_errors}",
            "# HELP elta_batches_total Forward passes of the model.",
            "# TYPE elta_batches_total counter",
            f"elta_batches_total {batches}",
            f"elta_batch_images_total {scored}",
            f"elta_batch_seconds_total {self.batch_seconds:.6f}",
            "# HELP elta_batch_size_mean Mean images per forward pass.",
            "# TYPE elta_batch_size_mean gauge",
            f"elta_batch_size_mean {self.mean_batch_size:.4f}",
            "# HELP elta_batch_size Forward passes by images per pass.",
            "# TYPE elta_batch_size counter",
        ]
        lines += [f'elta_batch_size{{size="{n}"}} {c}' for n, c in sorted(self.batch_sizes.items())]
        return "\n".join(lines) + "\n"


def model_info(predictor: Predictor) -> dict:
    """What ``GET /v1/model`` returns: the model, its scale, its calibration and the training scores."""
    spec = predictor.spec
    lo, hi = predictor.score_range
    training = None
    if spec.percentile([lo]) is not None:
        edges = np.linspace(lo, hi, HISTOGRAM_BINS + 1)
        cdf = spec.percentile(edges) / 100.0
        cdf[0], cdf[-1] = 0.0, 1.0  # the labels lie in the score range
        training = {
            "quantiles": list(spec.score_quantiles),
            "histogram": {"edges": edges.tolist(), "fraction": np.diff(cdf).tolist()},
        }
    calibration = None
    if spec.calibration:
        calibration = {
            "method": spec.calibration["method"],
            "fitted_on": spec.calibration.get("n_fit"),
            "applied": predictor.calibrated,
        }
    return {
        "elta_version": elta.__version__,
        "backbone": spec.backbone,
        "head": spec.head,
        "dataset": spec.dataset_format or None,
        "score_range": [lo, hi],
        "bins": [float(c) for c in spec.centers] if spec.num_bins else [],
        "image_size": spec.image_size,
        "calibration": calibration,
        "training_scores": training,
        "device": str(predictor.runtime.device),
    }


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _image_result(name: str, preds: Predictions | None, error: str, percentile: np.ndarray | None) -> dict:
    if preds is None:
        return {
            "name": name, "score": None, "std": None, "distribution": None, "score_uncalibrated": None,
            "percentile": None, "error": error,
        }  # fmt: skip
    return {
        "name": name,
        "score": _number(preds.score[0]),
        "std": _number(preds.std[0]),
        "distribution": None if preds.dist is None else [float(p) for p in preds.dist[0]],
        "score_uncalibrated": None if preds.uncalibrated is None else _number(preds.uncalibrated[0]),
        "percentile": None if percentile is None else _number(percentile[0]),
        "error": None,
    }


def page_html() -> str:
    """The page served at ``/`` (a package file)."""
    return resources.files("elta.workflows.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(predictor: Predictor, settings: ServeSettings | None = None):
    """The FastAPI app serving ``predictor``. Its lifespan starts and drains the batcher, so run it under an ASGI
    server (uvicorn) or ``with TestClient(app)``."""
    try:
        from fastapi import Depends, FastAPI, File, HTTPException, Request, UploadFile
        from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
        from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    except ImportError as exc:
        raise UnavailableError(
            f"elta serve needs FastAPI ({exc.name} is missing): pip install 'elta[serve]'"
        ) from exc

    settings = settings or ServeSettings()
    metrics = ServiceMetrics()
    transform = predictor.transform

    def score(images: list) -> Predictions:
        # the eval transform (resize, torch normalisation) runs here, in the scoring thread: torch work in the
        # decoding threads beside the model's forward would oversubscribe the CPU's threads
        return predictor.predict_images(images, desc="serving")

    batcher = Batcher(score, settings.max_batch, settings.max_wait_ms, on_batch=metrics.batch)
    # Decoding runs in its own few threads: many at once would only compete with the model for the CPU, and
    # each may hold an image of up to max_pixels in memory.
    decoding = asyncio.Semaphore(settings.decode_threads)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()  # after the server's last request: whatever is queued is scored

    app = FastAPI(
        title="elta",
        version=elta.__version__,
        description="Image aesthetics scores from an elta checkpoint. Photos are uploaded (multipart); the "
        "service never reads files on its own disk.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.settings = settings
    bearer = HTTPBearer(auto_error=False, description="the token given to `elta serve --token`")

    async def authorised(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if settings.token is None:
            return
        if credentials is None or not hmac.compare_digest(
            credentials.credentials.encode(), settings.token.encode()
        ):
            raise HTTPException(
                401,
                "missing or wrong token: send the header 'Authorization: Bearer TOKEN'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.middleware("http")
    async def count_and_limit(request: Request, call_next):
        started = time.perf_counter()
        response = _refuse_large_body(request) or await call_next(request)
        path = request.url.path
        if request.scope.get("route") is not None:
            path = request.scope["route"].path
        metrics.request(path, response.status_code, time.perf_counter() - started)
        return response

    def _refuse_large_body(request: Request):
        """Before the body is read: uploads need a declared length within the limit."""
        if request.method != "POST":
            return None
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            return JSONResponse({"detail": "send the upload with a Content-Length header"}, status_code=411)
        if int(length) > settings.max_request_bytes:
            return JSONResponse(
                {
                    "detail": f"the request is {int(length) / MB:.1f} MB; at most {settings.max_files} files "
                    f"of {settings.max_upload_mb:g} MB each are accepted"
                },
                status_code=413,
            )
        return None

    def decode(data: bytes, name: str) -> Image.Image:
        try:
            return load_image(data, settings.max_pixels, target=transform.needed_size)
        except ImageLoadError as exc:
            raise ImageLoadError(name, exc.reason) from exc

    async def decode_off_loop(data: bytes, name: str) -> Image.Image:
        async with decoding:
            return await asyncio.to_thread(decode, data, name)

    async def read_upload(upload: UploadFile, index: int) -> tuple[str, bytes | str]:
        """The file's name and bytes, or its name and why it is refused."""
        name = upload.filename or f"file {index + 1}"
        limit = int(settings.max_upload_mb * MB)
        if upload.size is not None and upload.size > limit:
            raise HTTPException(
                413,
                f"{name}: {upload.size / MB:.1f} MB is over the {settings.max_upload_mb:g} MB limit per file",
            )
        return name, await upload.read()

    @app.post("/v1/score", dependencies=[Depends(authorised)], summary="Score uploaded photos")
    async def score_photos(
        files: Annotated[list[UploadFile], File(description="one or more image files (JPEG, PNG, WebP, …)")],
    ) -> JSONResponse:
        """Per photo, in upload order: ``score`` (calibrated when the checkpoint has a map), ``std``,
        ``distribution`` (the vote histogram over ``bins``; null for a scalar head), ``score_uncalibrated`` (the
        model's own score when a map was applied), ``percentile`` (of the score among the training labels; null
        when the checkpoint does not record them) and ``error`` (why a photo could not be read, else null).

        A request in which no photo could be read is answered 422, with each photo's reason."""
        if len(files) > settings.max_files:
            raise HTTPException(
                413, f"{len(files)} files in one request; at most {settings.max_files} are accepted"
            )
        uploads = [await read_upload(upload, i) for i, upload in enumerate(files)]
        metrics.images += len(uploads)
        decoded = await asyncio.gather(
            *(decode_off_loop(data, name) for name, data in uploads), return_exceptions=True
        )
        for outcome in decoded:
            if isinstance(outcome, BaseException) and not isinstance(outcome, ImageLoadError):
                raise outcome
        good = [i for i, outcome in enumerate(decoded) if isinstance(outcome, Image.Image)]
        results = await batcher.submit([decoded[i] for i in good]) if good else []
        by_index = dict(zip(good, results, strict=True))
        images = []
        for i, (name, _) in enumerate(uploads):
            if i in by_index:
                preds = by_index[i].predictions
                images.append(_image_result(name, preds, "", predictor.spec.percentile(preds.score)))
            else:
                images.append(_image_result(name, None, str(decoded[i]), None))
        metrics.image_errors += len(uploads) - len(good)
        if not good:
            return JSONResponse(
                {"detail": "none of the uploaded files could be read as an image", "images": images},
                status_code=422,
            )
        return JSONResponse({"images": images})

    @app.get("/v1/model", dependencies=[Depends(authorised)], summary="The model being served")
    async def model() -> dict:
        """Backbone, head, training dataset, score range, rating bins, calibration, the training scores'
        percentiles and histogram (null for checkpoints that do not record them), elta's version."""
        return {**model_info(predictor), "limits": asdict(settings) | {"token": settings.token is not None}}

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict:
        return {"status": "ok" if batcher.running else "stopping"}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Counters in Prometheus' text format")
    async def metrics_text() -> str:
        return metrics.text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return page_html()

    return app


def serve(
    predictor: Predictor,
    settings: ServeSettings | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    graceful_seconds: float = 30.0,
    log_level: str = "info",
) -> None:
    """Serve ``predictor`` with uvicorn until SIGINT/SIGTERM; on a signal it stops accepting connections, lets
    requests in flight finish (for up to ``graceful_seconds``), then scores what is queued and exits."""
    app = create_app(predictor, settings)
    try:
        import uvicorn
    except ImportError as exc:
        raise UnavailableError("elta serve needs uvicorn: pip install 'elta[serve]'") from exc
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=graceful_seconds,
        server_header=False,
    )
    uvicorn.Server(config).run()
