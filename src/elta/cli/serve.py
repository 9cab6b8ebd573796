"""``elta serve``: score photos over HTTP, with a page to drop them on."""

from __future__ import annotations

import argparse
import logging
import os

from elta.cli.options import add_config_options, apply_options
from elta.config import RunConfig

__all__ = ["add_commands"]

log = logging.getLogger(__name__)


def serve(args: argparse.Namespace) -> int:
    from elta.engine.predictor import Predictor
    from elta.engine.runtime import Runtime
    from elta.workflows.serve import ServeSettings, serve

    settings = ServeSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_mb=args.max_upload_mb,
        max_files=args.max_files,
        token=args.token,
    )
    # One forward pass per batch: the loader batch is the service's batch, decoded already (no loader processes).
    runtime = Runtime.from_config(
        apply_options(RunConfig(), args).runtime, batch_size=args.max_batch, workers=0
    )
    predictor = Predictor.from_checkpoint(args.checkpoint, runtime, calibrated=not args.no_calibration)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.token is None:
        log.warning(
            "serving on %s without --token: anyone who can reach this port can use the API", args.host
        )
    log.info("elta serve: http://%s:%d/ (API docs at /docs)", args.host, args.port)
    serve(
        predictor,
        settings,
        host=args.host,
        port=args.port,
        graceful_seconds=args.graceful_seconds,
        log_level={-1: "warning", 0: "info", 1: "debug"}[args.verbosity],
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``serve``."""
    p = sub.add_parser(
        "serve",
        help="an HTTP scoring service and a page to drop photos on",
        description="Serve a checkpoint over HTTP: POST /v1/score (multipart uploads), GET /v1/model, /healthz, "
        "/metrics, the OpenAPI page at /docs, and a page at / to drop photos on. Needs the [serve] extra.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=32, help="images per forward pass at most (default 32)")
    p.add_argument(
        "--max-wait-ms", type=float, default=10.0,
        help="how long a batch waits for more images after its first (default 10 ms)",
    )  # fmt: skip
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="size limit per file (default 20 MB)")
    p.add_argument("--max-files", type=int, default=32, help="files per request at most (default 32)")
    p.add_argument(
        "--token", default=os.environ.get("ELTA_SERVE_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' on the API (/v1/...); default $ELTA_SERVE_TOKEN",
    )  # fmt: skip
    p.add_argument(
        "--graceful-seconds", type=float, default=30.0,
        help="on SIGTERM/Ctrl-C, how long requests in flight may take to finish (default 30)",
    )  # fmt: skip
    p.add_argument("--no-calibration", action="store_true", help="ignore a calibration map in the checkpoint")
    add_config_options(p, {"runtime": ("device", "amp")})
    p.set_defaults(func=serve)
