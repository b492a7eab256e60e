"""Sliding-window wrapper for any quantized cache (seed:
``veloxquant_mlx.cache.sliding_window_cache``)."""

from __future__ import annotations

import operator

from .. import _core
from .base import KVCache, QuantizedKVCache, _create


class SlidingWindowKVCache(KVCache):
    """Token eviction wrapper for any KVCache: keeps the most recent ``window`` tokens plus the
    first ``sink_tokens`` (StreamingLLM-style attention sinks) of an inner cache, freeing whole
    pages in place; nothing is re-encoded.

    A query at position q attends to the sinks and to positions (q - window, q]. ``size``
    keeps counting every token appended (bounded by the inner cache's ``max_seq_len``) while
    memory stays bounded by the window. Only tokens still held can be dequantized.
    """

    def __init__(self, inner: QuantizedKVCache, window: int, sink_tokens: int = 4) -> None:
        """Wraps ``inner``, taking it over: use the window cache from then on (the inner
        object raises ValueError when used again)."""
        if not isinstance(inner, QuantizedKVCache):
            raise ValueError(
                f"SlidingWindowKVCache wraps a quantized cache, got {type(inner).__name__}"
            )
        window, sink_tokens = operator.index(window), operator.index(sink_tokens)
        # Checked here too: the C++ constructor runs after the inner cache was handed over.
        if window < 1:
            raise ValueError(f"SlidingWindowKVCache: window must be >= 1, got {window}")
        if sink_tokens < 0:
            raise ValueError(f"SlidingWindowKVCache: sink_tokens must be >= 0, got {sink_tokens}")
        self._impl = _core.SlidingWindowKVCache(inner._take(), window, sink_tokens)

    @property
    def window(self) -> int:
        return self._c.window

    @property
    def sink_tokens(self) -> int:
        return self._c.sink_tokens

    @property
    def layer(self) -> int:
        """The inner cache's layer."""
        return self._c.layer

    def empty_like(self) -> SlidingWindowKVCache:
        """A new empty window cache of the same window, sinks and inner cache kind."""
        inner = _create(self.config, self.num_heads, self.head_dim, self.max_seq_len, self.layer)
        return SlidingWindowKVCache(inner, self.window, self.sink_tokens)
