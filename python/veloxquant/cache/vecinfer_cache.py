"""VecInfer cache (seed: ``veloxquant_mlx.cache.vecinfer_cache``)."""

from .base import QuantizedKVCache


class VecInferKVCache(QuantizedKVCache):
    """VecInfer cache with smooth scaling + product VQ (arXiv 2510.06175).

    Requires a pre-trained ``codebook`` and ``smooth_factors`` from calibration. This build
    does not provide the calibration yet: constructing the cache raises the core's ValueError,
    which names the missing calibration.
    """

    method = "vecinfer"
