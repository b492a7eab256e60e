"""KeyNormObserver: per-(layer, head) statistics of key norms that route tokens whose norm lies
far out in either tail to a higher-precision side store.

Large key norms carry large absolute quantization error; very small norms are often attention
sinks. A token is an outlier for (layer, head) when ``|log ||k|| - mean| > z_threshold * std``
over the norms seen so far (the tokens being appended included), once at least ``min_count``
norms were observed. Set ``KVCacheConfig.outlier_observer`` to one observer shared by every
layer's cache; flagged tokens are stored at ``outlier_bits`` (8 = int8, 16 = fp16) and merged
into the same softmax.

The class is the C++ one (thread-safe): ``KeyNormObserver(z_threshold=3.0, min_count=32)``,
``observe(layer, head, norms)``, ``is_outlier(layer, head, norm)``, ``stats(layer, head)``
(a ``KeyNormStats`` with count, mean_log, m2_log, min_norm, max_norm, std_log and
heterogeneity_ratio), ``set_stats`` and ``reset``.
"""

from .._core import KeyNormObserver, KeyNormStats

__all__ = ["KeyNormObserver", "KeyNormStats"]
