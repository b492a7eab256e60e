"""VeloxQuant: compressed key/value caches for transformer inference.

The seed's API over the C++ core: ``KVCacheConfig``, ``KVCacheFactory``, ``KVCacheBuilder``
(``veloxquant.cache.base``), the per-method cache classes (``veloxquant.cache.*_cache``),
``KeyNormObserver`` (``veloxquant.observers.key_norm``), and a transformers integration
(``veloxquant.integrations.transformers``, where torch and transformers are installed)::

    from veloxquant.cache.base import KVCacheConfig, KVCacheFactory
    cache = KVCacheFactory.create(KVCacheConfig(method="turboquant_rvq", bits=2), 8, 128)
    cache.append(keys, values); out = cache.attend(queries)
"""

from ._core import CENTER_MIN_TOKENS, TOKENS_PER_PAGE, CapacityError, known_methods
from .cache import (
    CommVQKVCache,
    FP16KVCache,
    KVCache,
    KVCacheBuilder,
    KVCacheConfig,
    KVCacheFactory,
    PolarQuantKVCache,
    QJLKVCache,
    QuantizedKVCache,
    RaBitQKVCache,
    RateQuantKVCache,
    SlidingWindowKVCache,
    SpectralQuantKVCache,
    TurboQuantRVQKVCache,
    VecInferKVCache,
)
from .observers.key_norm import KeyNormObserver

__version__ = "0.1.0"

__all__ = [
    "CENTER_MIN_TOKENS", "TOKENS_PER_PAGE", "CapacityError", "CommVQKVCache", "FP16KVCache",
    "KVCache", "KVCacheBuilder", "KVCacheConfig", "KVCacheFactory", "KeyNormObserver",
    "PolarQuantKVCache", "QJLKVCache", "QuantizedKVCache", "RaBitQKVCache", "RateQuantKVCache",
    "SlidingWindowKVCache", "SpectralQuantKVCache", "TurboQuantRVQKVCache", "VecInferKVCache",
    "known_methods",
]
