"""Training plug-ins that act between the feature extractor and the head, registered by name."""

from elta.enhancers import elta as _elta  # noqa: F401  (registers tfa, flsa)
from elta.enhancers.base import (
    ENHANCERS,
    Enhancer,
    StepState,
    TrainingContext,
    build_enhancers,
    parse_enhancer,
    register_enhancer,
)

__all__ = [
    "ENHANCERS",
    "Enhancer",
    "StepState",
    "TrainingContext",
    "build_enhancers",
    "parse_enhancer",
    "register_enhancer",
]
