"""PolarQuant cache (seed: ``veloxquant_mlx.cache.polar_cache``)."""

from .base import QuantizedKVCache


class PolarQuantKVCache(QuantizedKVCache):
    """PolarQuant cache (arXiv 2502.02617). Zero calibration; encodes keys as polar angles.

    Keys are rotated, then pass through a 4-level recursive polar transform: level-1 angles
    get ``bits + 2`` bits, levels 2-4 ``bits`` bits with Lloyd-Max codebooks for their
    laws; the head dim must be a multiple of 16.
    """

    method = "polarquant"
