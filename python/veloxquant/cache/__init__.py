"""Configuration, factory, builder and every cache class (seed: ``veloxquant_mlx.cache``)."""

from .base import (
    FP16KVCache,
    KVCache,
    KVCacheBuilder,
    KVCacheConfig,
    KVCacheFactory,
    QuantizedKVCache,
)
from .commvq_cache import CommVQKVCache
from .polar_cache import PolarQuantKVCache
from .qjl_cache import QJLKVCache
from .rabitq_cache import RaBitQKVCache
from .ratequant_cache import RateQuantKVCache
from .sliding_window_cache import SlidingWindowKVCache
from .spectral_cache import SpectralQuantKVCache
from .turboquant_rvq_cache import TurboQuantRVQKVCache
from .vecinfer_cache import VecInferKVCache

__all__ = [
    "CommVQKVCache", "FP16KVCache", "KVCache", "KVCacheBuilder", "KVCacheConfig",
    "KVCacheFactory", "PolarQuantKVCache", "QJLKVCache", "QuantizedKVCache", "RaBitQKVCache",
    "RateQuantKVCache", "SlidingWindowKVCache", "SpectralQuantKVCache", "TurboQuantRVQKVCache",
    "VecInferKVCache",
]
