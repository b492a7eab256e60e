"""QJL cache (seed: ``veloxquant_mlx.cache.qjl_cache``)."""

from .base import QuantizedKVCache


class QJLKVCache(QuantizedKVCache):
    """QJL 1-bit sign sketch cache (arXiv 2406.03482).

    Each key is stored as the ``sketch_dim`` sign bits of a seeded Gaussian sketch and its
    norm; scores use the unbiased estimator sqrt(pi/2)/m * ||k|| * <S q, sign(S k)>. ``bits``
    must be 1 (the rate is set by ``sketch_dim``).
    """

    method = "qjl"
