"""elta: long-tail-aware image aesthetics assessment.

>>> import elta
>>> predictor = elta.load("runs/demo/best.pt")
>>> predictor.score(["photo.jpg"])          # DataFrame: path, score, std, p1..pK, error
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load", "Predictor", "__version__"]


def __getattr__(name: str):
    # Imported on first use so that `elta --help` and `import elta` stay fast.
    if name in ("load", "Predictor"):
        from elta.engine import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'elta' has no attribute {name!r}")
