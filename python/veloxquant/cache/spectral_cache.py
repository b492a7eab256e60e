"""SpectralQuant cache (seed: ``veloxquant_mlx.cache.spectral_cache``)."""

from .base import QuantizedKVCache


class SpectralQuantKVCache(QuantizedKVCache):
    """SpectralQuant cache. Requires per-layer rotation matrices from ``calibrate_spectral_rotation()``.

    This build does not provide the calibration yet: constructing the cache raises the core's
    ValueError, which names the missing calibration.
    """

    method = "spectral"
