"""Image transforms with explicit randomness.

The training transform draws its crop and flip from a seed given per sample, so an epoch's
augmentations depend only on (run seed, epoch, sample index): the same with any number of worker
processes, and the same after a resume in the middle of an epoch.

Paper defaults: train = resize to 300×300, random crop 256, random horizontal flip; eval = resize to
256×256; normalisation of the backbone's pretraining.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

__all__ = ["ImageTransform"]


@dataclass(frozen=True)
class ImageTransform:
    """PIL RGB image -> normalised float tensor [3, image_size, image_size] (with ``normalize`` off: RGB in
    [0, 1], for an exported model that normalises inside its graph)."""

    image_size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    train: bool = False
    normalize: bool = True

    def __call__(self, image: Image.Image, seed: int | None = None) -> torch.Tensor:
        interp = InterpolationMode(self.interpolation)
        if self.train:
            image = TF.resize(image, [self.resize, self.resize], interpolation=interp)
            rng = random.Random(seed)
            top = rng.randint(0, self.resize - self.image_size)
            left = rng.randint(0, self.resize - self.image_size)
            image = TF.crop(image, top, left, self.image_size, self.image_size)
            if rng.random() < 0.5:
                image = TF.hflip(image)
        else:
            image = TF.resize(image, [self.image_size, self.image_size], interpolation=interp)
        tensor = TF.pil_to_tensor(image).float().div_(255.0)
        return TF.normalize(tensor, self.mean, self.std) if self.normalize else tensor

    @property
    def needed_size(self) -> int:
        """The smallest image side (px) this transform uses without upsampling: resize, or image_size."""
        return self.resize if self.train else self.image_size

    @classmethod
    def from_spec(cls, spec, train: bool = False, normalize: bool = True) -> ImageTransform:
        """From a :class:`elta.models.ModelSpec` (or anything with the same attributes)."""
        return cls(
            spec.image_size,
            spec.resize,
            tuple(spec.mean),
            tuple(spec.std),
            spec.interpolation,
            train,
            normalize,
        )
