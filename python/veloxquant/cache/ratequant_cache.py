"""RateQuant cache (seed: ``veloxquant_mlx.cache.ratequant_cache``)."""

from .base import QuantizedKVCache


class RateQuantKVCache(QuantizedKVCache):
    """RateQuant cache: a TurboQuant scalar codec whose bit width comes from ``bit_allocation``.

    Keys are "L" (layer L) or "L.H" (KV head H of layer L), finer entries overriding coarser,
    missing entries falling back to ``bits``. Build per-layer caches with
    ``KVCacheBuilder.build`` so each cache knows its layer.
    """

    method = "ratequant"
