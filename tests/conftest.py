"""Shared fixtures: small real datasets built once per session, always offline."""

from __future__ import annotations

import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A 90-image demo dataset in the AVA layout (real photo crops, 64 px)."""
    from elta.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo_data")
    make_demo_dataset(root, n=90, seed=3, image_size=64)
    return root


def tiny_config(
    data_root,
    *,
    epochs: int = 1,
    image_size: int = 48,
    enhancers: list[dict] | None = None,
    data: dict | None = None,
    model: dict | None = None,
    train: dict | None = None,
    runtime: dict | None = None,
):
    """The small CPU run every training test starts from: the demo data's AVA.txt, ``test_convnext`` without
    pretrained weights at ``image_size`` px (resize + 8), batch 16, lr 1e-3; ``data`` / ``model`` / ``train`` /
    ``runtime`` override fields of their section."""
    from elta.config import DataConfig, ModelConfig, RunConfig, RuntimeConfig, TrainConfig

    return RunConfig(
        data=DataConfig(**{"data": str(data_root / "AVA.txt"), **(data or {})}),
        model=ModelConfig(
            **{
                "backbone": "test_convnext",
                "weights": "none",
                "image_size": image_size,
                "resize": image_size + 8,
            }
            | (model or {})
        ),
        train=TrainConfig(**{"epochs": epochs, "batch_size": 16, "lr": 1e-3, **(train or {})}),
        runtime=RuntimeConfig(**{"device": "cpu", "workers": 0, **(runtime or {})}),
        enhancers=list(enhancers or []),
    )


def tiny_train_args(data_root, out, *, backbone="test_convnext", epochs=1) -> list[str]:
    """`elta train` arguments for a small CPU run on a demo dataset (48 px, batch 16, no pretrained weights)."""
    return [
        "train", "--data", str(data_root / "AVA.txt"), "--out", str(out), "--backbone", backbone,
        "--weights", "none", "--image-size", "48", "--resize", "56", "--epochs", str(epochs),
        "--batch-size", "16", "--lr", "1e-3", "--device", "cpu", "--workers", "0",
    ]  # fmt: skip


def reference_and_resumed(cfg, tmp_path):
    """Train ``cfg`` uninterrupted, and again stopped after its first epoch and resumed; their last.pt."""
    from elta.engine.trainer import train
    from elta.models.checkpoint import load_checkpoint

    train(cfg, tmp_path / "reference")

    def stop(epoch, _row):
        if epoch == 1:
            raise KeyboardInterrupt

    try:
        train(cfg, tmp_path / "resumed", on_epoch=stop)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the run was not stopped after its first epoch")
    train(cfg, tmp_path / "resumed", resume=True)
    return tuple(load_checkpoint(tmp_path / run / "last.pt") for run in ("reference", "resumed"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
