"""TurboQuant RVQ cache (seed: ``veloxquant_mlx.cache.turboquant_rvq_cache``)."""

from .base import QuantizedKVCache


class TurboQuantRVQKVCache(QuantizedKVCache):
    """KV cache backed by TurboQuant with residual stages (arXiv 2504.19874).

    Each key is stored as its norm and ``num_residuals`` stages of ``bits``-bit Lloyd-Max
    indices of its randomly rotated unit vector (the first stage fitted to the coordinate law
    of a rotated unit vector, the next ones to the residual's law). Scores rotate the query
    once and gather-add lookup tables. Zero calibration.
    """

    method = "turboquant_rvq"
