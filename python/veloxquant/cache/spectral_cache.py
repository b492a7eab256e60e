"""SpectralQuant cache (seed: ``veloxquant_mlx.cache.spectral_cache``)."""

from .base import QuantizedKVCache


class SpectralQuantKVCache(QuantizedKVCache):
    """SpectralQuant cache. Requires ``rotations`` from ``calibrate_spectral_rotation()``: per
    layer an array [kv_heads][d + 3][d] of the key covariance's eigenvectors (rows), eigenvalues,
    the key mean and the queries' second moments along the eigenvectors. The budget is
    ``signal_bits`` on the first d_eff (participation ratio) whitened coordinates and
    ``noise_bits`` on the rest, distributed over the coordinates by the expected score error
    (query moment times eigenvalue); without ``rotations`` constructing the cache raises the
    core's ValueError, which names the missing calibration.
    """

    method = "spectral"
