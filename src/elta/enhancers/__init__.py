"""Training plug-ins that act between the feature extractor and the head, registered by name."""

# Importing the modules registers their enhancers by name.
from elta.enhancers import bmc, cmixup, conr, elta, fds, lds, ranksim, sampler  # noqa: F401
from elta.enhancers.base import (
    ENHANCERS,
    Enhancer,
    StepState,
    TrainingContext,
    build_enhancers,
    check_enhancers,
    parse_enhancer,
    register_enhancer,
    scalar_head_users,
)

__all__ = [
    "ENHANCERS",
    "Enhancer",
    "StepState",
    "TrainingContext",
    "build_enhancers",
    "check_enhancers",
    "parse_enhancer",
    "register_enhancer",
    "scalar_head_users",
]
