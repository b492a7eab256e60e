"""Observers that watch keys as they are appended (seed: ``veloxquant_mlx.observers``)."""

from .key_norm import KeyNormObserver, KeyNormStats

__all__ = ["KeyNormObserver", "KeyNormStats"]
