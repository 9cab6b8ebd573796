"""``elta demo``: build the demo data, fine-tune the offline ImageNet backbone, evaluate, print the metrics."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from elta.config import DataConfig, ModelConfig, RunConfig, RuntimeConfig, TrainConfig

__all__ = ["demo_config", "run_demo"]

log = logging.getLogger(__name__)


def demo_config(data_dir: str | Path, device: str = "auto") -> RunConfig:
    """The demo's training recipe: EfficientNet-Lite0 (ImageNet weights that load offline), fine-tuned with one
    learning rate for the whole model and no weight averaging (the numbers in the README are from it)."""
    recipe = {"epochs": 4, "batch_size": 32, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 1e-4}
    recipe |= {
        "schedule": "cosine",
        "warmup_epochs": 0.5,
        "grad_clip": 5.0,
        "backbone_lr_scale": 1.0,
        "ema": 0.0,
    }
    return RunConfig(
        data=DataConfig(data=str(Path(data_dir) / "AVA.txt")),
        model=ModelConfig(backbone="tf_efficientnet_lite0", weights="imagenet", image_size=192, resize=208),
        train=TrainConfig(**recipe),
        runtime=RuntimeConfig(device=device),
    )


def run_demo(out: str | Path = "elta-demo", progress: bool = False, device: str = "auto") -> dict:
    """Everything under ``out``: data/, run/, eval/. Re-running reuses finished steps."""
    from elta.data.demo import demo_dataset_exists, make_demo_dataset
    from elta.engine.evaluate import evaluate_checkpoint
    from elta.engine.runtime import Runtime
    from elta.engine.trainer import train
    from elta.metrics import format_metrics

    out = Path(out)
    data_dir, run_dir, eval_dir = out / "data", out / "run", out / "eval"
    started = time.perf_counter()
    if demo_dataset_exists(data_dir):
        log.info("demo data: reusing %s", data_dir)
    else:
        log.info("building the demo dataset in %s …", data_dir)
        make_demo_dataset(data_dir, progress=progress)
    cfg = demo_config(data_dir, device=device)
    train(cfg, run_dir, resume=True, progress=progress)
    runtime = Runtime.from_config(cfg.runtime, progress=progress)
    metrics = evaluate_checkpoint(run_dir / "best.pt", cfg, eval_dir, runtime, split="test")
    minutes = (time.perf_counter() - started) / 60
    print(format_metrics(metrics, title="elta demo: test split"))
    print(f"\nfinished in {minutes:.1f} min")
    print(f"checkpoint:  {run_dir / 'best.pt'}")
    print(f"predictions: {eval_dir / 'predictions.csv'}")
    print(f"report:      {eval_dir / 'report.png'}")
    print(
        "\nThis model learned the demo data's labels: how strongly blur, noise and JPEG artefacts degrade crops\n"
        "of five photos. It is a working example of the pipeline, not a model of aesthetics; train on AVA,\n"
        "PARA, TAD66K, AADB or KonIQ (see the README) for that. Scoring works the same way:\n"
        f"  elta predict --checkpoint {run_dir / 'best.pt'} PHOTOS/ --out scores.csv"
    )
    return metrics
