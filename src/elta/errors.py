"""Every error elta reports to a user, under one base class.

The command line prints an :class:`EltaError` (or an ``OSError``) as one line and exits with status 2; any other
exception is a bug and shows its traceback. Each class also derives from the built-in exception it refines, so
``except ValueError`` keeps working for library users.
"""

from __future__ import annotations

__all__ = [
    "EltaError",
    "ConfigError",
    "AnnotationError",
    "ImageLoadError",
    "CheckpointError",
    "CacheError",
    "IncompatibleDataError",
    "WeightsUnavailableError",
    "RunExistsError",
    "TrainingDivergedError",
    "APDSUnavailableError",
    "CalibrationError",
    "StaleStageError",
    "UnavailableError",
    "ExportError",
]


class EltaError(Exception):
    """A problem with the user's input, files or environment, explained in the message."""


class ConfigError(EltaError, ValueError):
    """A setting has a wrong type or value; the message names ``section.key`` and its flag."""


class AnnotationError(EltaError, ValueError):
    """An annotation file cannot be used; the message names the file and the row."""


class ImageLoadError(EltaError):
    """An image that cannot be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class CheckpointError(EltaError, ValueError):
    """The file is not a checkpoint this version can read."""


class CacheError(EltaError, ValueError):
    """A folder of cached images cannot be used: its marker is unreadable or of another kind, or the
    original images are asked for and it is a cache."""


class IncompatibleDataError(EltaError, ValueError):
    """A dataset does not fit a model: another number of rating bins or another rating scale."""


class WeightsUnavailableError(EltaError, RuntimeError):
    """Pretrained weights were asked for but cannot be obtained here."""


class RunExistsError(EltaError, RuntimeError):
    """The output folder already holds a run and --resume was not given."""


class TrainingDivergedError(EltaError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class APDSUnavailableError(EltaError, ValueError):
    """The teacher predicts one score, not a distribution over rating bins, so APDS cannot sharpen it."""


class CalibrationError(EltaError, ValueError):
    """A calibration cannot be fitted on the data given: no (β, t) cell of the APDS grid selects enough
    calibration images, or the predictions or labels allow no strictly increasing score map."""


class StaleStageError(EltaError, RuntimeError):
    """A finished self-training stage no longer matches its inputs."""


class UnavailableError(EltaError, RuntimeError):
    """What a setting asks for is not available here: a CUDA device, the compiler stack, an optional package,
    or a folder that another process holds."""


class ExportError(EltaError, RuntimeError):
    """A model cannot be exported: no exporter handles it, or the exported model does not reproduce the PyTorch
    model's scores within the tolerance. Nothing is written."""
