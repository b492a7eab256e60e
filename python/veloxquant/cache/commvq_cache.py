"""CommVQ cache (seed: ``veloxquant_mlx.cache.commvq_cache``)."""

from .base import QuantizedKVCache


class CommVQKVCache(QuantizedKVCache):
    """CommVQ cache: additive VQ of keys with RoPE-commutative codewords (arXiv 2506.18879).

    The codebooks are trained on calibration keys (``veloxquant calibrate --method commvq``);
    pass them as ``config.codebook`` with ``num_subspaces`` (and ``rope_inv_freq`` in C++ for
    position-aware coding). Without them construction raises the core's ValueError, which
    names the calibration call.
    """

    method = "commvq"
