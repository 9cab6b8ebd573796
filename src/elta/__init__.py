"""elta: long-tail-aware image aesthetics assessment."""

__version__ = "0.1.0"
