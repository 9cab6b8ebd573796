from elta.models.backbones import WeightsUnavailableError, create_backbone
from elta.models.model import AestheticModel, ModelOutput, ModelSpec, build_model

__all__ = [
    "AestheticModel",
    "ModelOutput",
    "ModelSpec",
    "build_model",
    "create_backbone",
    "WeightsUnavailableError",
]
