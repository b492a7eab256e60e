"""CommVQ cache (seed: ``veloxquant_mlx.cache.commvq_cache``)."""

from .base import QuantizedKVCache


class CommVQKVCache(QuantizedKVCache):
    """CommVQ cache: additive VQ of keys with RoPE-commutative codewords (arXiv 2506.18879).

    The codebooks are trained on calibration keys. This build does not provide the
    calibration yet: constructing the cache raises the core's ValueError, which names the
    missing calibration.
    """

    method = "commvq"
