"""The model, enhancers and batch shared by the distributed step test and its single-process reference."""

from __future__ import annotations

import torch

from elta.enhancers import TrainingContext, build_enhancers
from elta.models import build_model

ENHANCERS = [{"name": "fds", "bin_width": 1.0}, {"name": "flsa", "weight": 1.0}]
BATCH = 7  # odd: the two processes get 3 and 4 rows


def make_model_and_enhancers():
    torch.manual_seed(0)
    # test_convnext normalises with LayerNorm: per-sample, so a share's forward equals the whole batch's
    model = build_model(
        "test_convnext", "distribution", list(range(1, 11)), [1, 10], weights="none", image_size=32
    )
    model.train()
    enhancers = build_enhancers(ENHANCERS)
    context = TrainingContext(
        scores=torch.linspace(1, 10, 20),
        groups=[""] * 20,
        score_range=(1.0, 10.0),
        num_bins=10,
        loss="emd",
        feature_dim=model.backbone.num_features,
        epochs=2,
    )
    for enhancer in enhancers:
        enhancer.setup(context)
    return model, enhancers


def make_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    dist = torch.softmax(3 * torch.randn(BATCH, 10, generator=generator), 1)
    return {
        "images": torch.randn(BATCH, 3, 32, 32, generator=generator),
        "mos": dist @ torch.arange(1.0, 11.0),
        "dist": dist,
        "weight": torch.rand(BATCH, generator=generator)
        + 0.5,  # unequal weights: the global normaliser matters
        "indices": torch.arange(BATCH),
    }
