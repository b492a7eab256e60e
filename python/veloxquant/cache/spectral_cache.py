"""SpectralQuant cache (seed: ``veloxquant_mlx.cache.spectral_cache``)."""

from .base import QuantizedKVCache


class SpectralQuantKVCache(QuantizedKVCache):
    """SpectralQuant cache. Requires ``rotations`` from ``calibrate_spectral_rotation()``: per
    layer an array [kv_heads][d + 2][d] of the key covariance's eigenvectors (rows), eigenvalues
    and the key mean. The first d_eff (participation ratio) whitened coordinates get
    ``signal_bits``, the rest ``noise_bits``; without ``rotations`` constructing the cache raises
    the core's ValueError, which names the missing calibration.
    """

    method = "spectral"
