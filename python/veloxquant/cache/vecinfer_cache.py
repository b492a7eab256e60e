"""VecInfer cache (seed: ``veloxquant_mlx.cache.vecinfer_cache``)."""

from .base import QuantizedKVCache


class VecInferKVCache(QuantizedKVCache):
    """VecInfer cache with smooth scaling + product VQ (arXiv 2510.06175).

    Requires a pre-trained ``codebook`` and ``smooth_factors`` from calibration
    (``veloxquant calibrate --method vecinfer``). Without them construction raises the core's
    ValueError, which names the calibration call.
    """

    method = "vecinfer"
