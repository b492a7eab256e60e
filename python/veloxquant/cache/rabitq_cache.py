"""RaBitQ cache (seed: ``veloxquant_mlx.cache.rabitq_cache``)."""

from .base import QuantizedKVCache


class RaBitQKVCache(QuantizedKVCache):
    """RaBitQ cache with IVF centroids (arXiv 2405.12497; extended RaBitQ for bits > 1).

    ``num_clusters`` centroids per head are trained by k-means on the first append; each
    key stores its cluster id, the sign (or extended) code of its rotated unit residual and
    one correction factor, which make the score estimator unbiased.
    """

    method = "rabitq"
