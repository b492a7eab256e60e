"""The CUDA backend from Python: one layer's cache of one sequence, resident on the GPU, fed and
read through torch CUDA tensors (DLPack, zero-copy). Two cache classes::

    import torch
    from veloxquant.cache.base import KVCacheConfig
    from veloxquant.cuda import CudaKVCache, CudaTurboQuantCache

    cache = CudaTurboQuantCache(KVCacheConfig(method="turboquant_rvq", bits=1, value_bits=2),
                                num_heads=8, head_dim=128, max_seq_len=32768)
    cache.append(keys, values)      # [8, n, 128] (or [1, 8, n, 128]) on the GPU
    out = cache.attend(queries)     # [32, 128] -> [32, 128]: decode, one query per head

    cache = CudaKVCache(KVCacheConfig(method="qjl", bits=3), num_heads=8, head_dim=96)
    cache.append(keys, values)      # a prefill chunk of n tokens
    out = cache.attend(queries)     # [32, n, 96]: causal attention of the chunk, on the codes
    out = cache.attend(queries[:, -1])  # [32, 96]: decode

A batch of sequences decodes through ``CudaTurboQuantBatch`` over their CudaTurboQuantCaches
(``CudaKVCacheBatch`` over CudaKVCaches): one input check for every sequence's new token and one
decode launch for all of them.

Work is queued on torch's current CUDA stream of the cache's device, so it orders with the
surrounding torch work without synchronizing (except a rabitq cache's first append, which
trains the IVF centroids as the CPU cache does: its training rows are rotated on the host and
its k-means runs on the device, synchronized). Inputs may be float32, float16 or
bfloat16 (the latter two are converted to float32 on the device); outputs come back in the
queries' dtype. Both classes store pages in the CPU cache's layout (``layout``, ``page``), and
go to and from the CPU's caches and their files (``to_cpu``, ``save``, ``from_cpu``, ``load``).

Scope (the kernels' own, ``src/cuda/cuda_cache.h`` and ``src/cuda/codec_cache.h``); anything
else raises ValueError at construction:

- ``CudaTurboQuantCache``: method turboquant_rvq with the Hadamard rotation, head_dim 64 or 128,
  key bits 1..4 with 1..3 stages (``num_residuals``), value_bits 1, 2, 4 or 16, no outlier
  observer, and 1..8 query heads per KV head; decode only (one query per head), with the tuned
  tensor-core kernel. It takes ``center_keys`` (the first append estimates the keys' pre-RoPE
  mean on the device, each decode adds one offset per page and query head) or a sliding window
  (``window``, ``sink_tokens``; its decodes take the general kernels, not the mixed-row ones).
- ``CudaKVCache``: every method (turboquant_rvq, ratequant, qjl, polarquant, rabitq, vecinfer,
  spectral, commvq, fp16) with the config the CPU cache takes (the calibrated fields of
  vecinfer, spectral and commvq, and optionally rabitq's ``ivf_centroids``; without them rabitq
  trains on its first append), head_dim up to 256, any multiple of the KV heads as query heads;
  decode and causal prefill chunks on the codes, within 1e-3 of the CPU cache's attention. It
  takes ``center_keys`` at head_dim up to 128 (the first append estimates the mean on the device;
  rabitq then trains on the centred keys; each chunk of 32 tokens adds its page's
  offset to its scores), a sliding window (``window``, ``sink_tokens``: the CPU's
  ``SlidingWindowKVCache``, evicted pages given back to its pool), and an outlier observer
  (``outlier_observer``, ``outlier_bits``: each append's key norms are observed on the host, the
  tokens it flags are kept at int8 or fp16 in a side store on the device, with the CPU encoder's
  bytes, and scored from there in the same softmax; a ``CudaKVCacheBatch`` takes such caches
  too, its observer seeing the sequences' norms in sequence order).

A build without the CUDA backend (the default wheel: ``VQ_CUDA=OFF``) still imports this
module; ``HAS_CUDA`` is then False and constructing a cache raises RuntimeError saying so.
"""

from __future__ import annotations

import math
import operator
import os
from typing import Any, ClassVar

from . import _core
from .cache.base import KVCache, KVCacheConfig, warn_if_left_uncentred

HAS_CUDA: bool = bool(getattr(_core, "HAS_CUDA", False))
"""Whether this build of the extension has the CUDA backend (VQ_CUDA=ON)."""

BUILT_WITHOUT_CUDA = (
    "veloxquant was built without CUDA (VQ_CUDA=OFF, the default wheel): rebuild the extension "
    "with the CUDA backend, e.g. pip install . -C cmake.define.VQ_CUDA=ON "
    "-C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 (bench/cuda/run_python_h200.sh builds it)"
)

_FLOAT_TYPES = ("float32", "float16", "bfloat16")


def is_available() -> bool:
    """True when this build has the CUDA backend, torch is importable and sees a CUDA device."""
    if not HAS_CUDA:
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available()) and _core.cuda_device_count() > 0


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("veloxquant.cuda works on torch CUDA tensors: install torch") from e
    return torch


def _resolve_device(device: Any) -> Any:
    """device (None: torch's current one, an index, "cuda:N" or a torch.device) as a
    torch.device with its index."""
    if not HAS_CUDA:
        raise RuntimeError(BUILT_WITHOUT_CUDA)
    torch = _torch()
    if not torch.cuda.is_available():
        raise RuntimeError("veloxquant.cuda: torch sees no CUDA device")
    resolved = torch.device("cuda", torch.cuda.current_device()) if device is None \
        else torch.device(device)
    if resolved.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {resolved}")
    if resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


class _DeviceCache:
    """What both device caches share (see the module doc): construction on a device, appends,
    dequantization, trimming and the page layout. ``device`` (an index, "cuda:N" or a
    torch.device; default: torch's current device) is where the pages live; every tensor passed
    in must be on it."""

    _core_class: ClassVar[str]  # the _core class this wraps

    def __init__(self, config: KVCacheConfig, num_heads: int, head_dim: int,
                 max_seq_len: int = 8192, layer: int = 0, device: Any = None, *,
                 window: int = 0, sink_tokens: int = 4) -> None:
        self.device = _resolve_device(device)
        torch = _torch()
        self.config = config
        self.layer = int(layer)
        with torch.cuda.device(self.device):
            self._impl = getattr(_core, self._core_class)(
                config.to_core(), int(num_heads), int(head_dim), int(max_seq_len), self.layer,
                operator.index(window), operator.index(sink_tokens))

    # --- helpers ------------------------------------------------------------------------------
    def _stream(self) -> int:
        return int(_torch().cuda.current_stream(self.device).cuda_stream)

    def _float32(self, x: Any, name: str) -> Any:
        """x as float32 on the device; the C++ side reports the device, shape and layout."""
        torch = _torch()
        if not isinstance(x, torch.Tensor):
            return x  # any DLPack array: the binding checks it (float32 CUDA only)
        if x.device.type != "cuda":
            raise ValueError(f"{name} must be a CUDA tensor on {self.device}, got a tensor on "
                             f"{x.device} (move it with .to('{self.device}'))")
        if str(x.dtype).replace("torch.", "") not in _FLOAT_TYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
        return x if x.dtype == torch.float32 else x.float()

    def _scale(self, scale: float | None) -> float:
        return 1.0 / math.sqrt(self.head_dim) if scale is None else float(scale)

    @staticmethod
    def _in_dtype_of(result: Any, queries: Any) -> Any:
        """A float32 result converted to the queries' dtype."""
        torch = _torch()
        dtype = getattr(queries, "dtype", torch.float32)
        return result if dtype == torch.float32 else result.to(dtype)

    # --- data ---------------------------------------------------------------------------------
    def append(self, keys: Any, values: Any) -> None:
        """Encodes new tokens: keys and values [num_heads, n, head_dim] (or [1, num_heads, n,
        head_dim]) on the device. CapacityError (a ValueError) past max_seq_len, leaving the
        cache as it was. A centred cache's first append of fewer than CENTER_MIN_TOKENS tokens
        warns that its keys stay uncentred."""
        size = self.size
        k = self._float32(keys, "keys")
        self._impl.append(k, self._float32(values, "values"), self._stream())
        warn_if_left_uncentred(self.config.center_keys, size, k.shape[-2])

    def dequantize(self, start: int = 0, n_tokens: int | None = None) -> tuple[Any, Any]:
        """Reconstructed (keys, values) of tokens [start, start + n_tokens) (default: to the
        end), float32 [num_heads, n_tokens, head_dim] tensors on the device."""
        torch = _torch()
        if n_tokens is None:
            n_tokens = self.size - int(start)
        if start < 0 or n_tokens < 0 or start + n_tokens > self.size:
            raise IndexError(f"dequantize: range [{start}, {start + n_tokens}) is outside "
                             f"[0, {self.size})")
        shape = (self.num_heads, int(n_tokens), self.head_dim)
        keys = torch.empty(shape, dtype=torch.float32, device=self.device)
        values = torch.empty(shape, dtype=torch.float32, device=self.device)
        if n_tokens > 0:
            self._impl.dequantize(int(start), keys, values, self._stream())
        return keys, values

    def trim(self, n_tokens: int) -> int:
        """Removes the last n_tokens tokens (at most size); returns how many were removed."""
        n = max(0, min(int(n_tokens), self.size))
        self._impl.truncate(self.size - n)
        return n

    def reset(self) -> None:
        """Forgets every token; the pages stay allocated for reuse (and trained state such as
        rabitq's IVF centroids is kept, as on the CPU)."""
        self._impl.reset()

    def empty_like(self) -> Any:
        """A new empty cache of the same class, config, shape, capacity, layer, device and
        window."""
        return type(self)(self.config, self.num_heads, self.head_dim, self.max_seq_len,
                          self.layer, self.device, window=self.window,
                          sink_tokens=self.sink_tokens)

    def position_held(self, pos: int) -> bool:
        """Whether position ``pos`` is stored (not evicted by the sliding window)."""
        return bool(self._impl.position_held(int(pos)))

    def _window_repr(self) -> str:
        return f", window={self.window}, sink_tokens={self.sink_tokens}" if self.window else ""

    # --- the CPU and files --------------------------------------------------------------------
    def to_cpu(self) -> KVCache:
        """A CPU cache (the method's ``veloxquant`` cache class, in a ``SlidingWindowKVCache``
        of the same window where this cache has one) holding these pages and the codecs'
        learned state (rabitq's centroids, a centred cache's key mean); synchronizes the
        device."""
        _torch().cuda.synchronize(self.device)
        return KVCache._wrap(self._impl.to_host())

    def save(self, path: str | os.PathLike) -> None:
        """Writes the cache file a CPU cache writes (versioned, checksummed, atomic): it loads
        with ``veloxquant.cache.base.KVCache.load`` or this class's ``load``."""
        _torch().cuda.synchronize(self.device)
        self._impl.save(os.fspath(path))

    @classmethod
    def from_cpu(cls, cache: KVCache, device: Any = None) -> Any:
        """A device cache of this class holding a CPU cache's pages (a quantized cache of a
        config this class takes, or a ``SlidingWindowKVCache`` around one, whose window it
        takes; ``CudaKVCache`` also takes outlier entries); ValueError otherwise."""
        torch = _torch()
        self = cls.__new__(cls)
        self.device = _resolve_device(device)
        self.config = cache.config
        self.layer = int(getattr(cache._c, "layer", 0))
        with torch.cuda.device(self.device):
            self._impl = getattr(_core, cls._core_class).from_host(cache._c)
        return self

    @classmethod
    def load(cls, path: str | os.PathLike, device: Any = None) -> Any:
        """Reads a cache file (written by ``save`` or by a CPU cache) onto the device;
        RuntimeError for a truncated, corrupted or forged file."""
        return cls.from_cpu(KVCache.load(path), device)

    def page(self, index: int) -> Any:
        """The raw bytes of page ``index`` (numpy uint8; synchronizes the device), in the CPU
        cache's page layout (``layout``)."""
        _torch().cuda.synchronize(self.device)
        return self._impl.page(int(index))

    # --- properties ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._impl.size

    def __len__(self) -> int:
        return self._impl.size

    @property
    def max_seq_len(self) -> int:
        return self._impl.max_seq_len

    @property
    def num_heads(self) -> int:
        return self._impl.num_heads

    @property
    def head_dim(self) -> int:
        return self._impl.head_dim

    @property
    def nbytes(self) -> int:
        """Device bytes held: the page pool (grown by a quarter at a time up to max_seq_len), its
        page table, the codec parameters and the attention workspace."""
        return self._impl.nbytes

    @property
    def window(self) -> int:
        """The sliding window's width (0: no window)."""
        return self._impl.window

    @property
    def sink_tokens(self) -> int:
        """The positions a sliding window always keeps (0 without a window)."""
        return self._impl.sink_tokens

    @property
    def layout(self) -> dict:
        """The page layout: tokens_per_page, page_bytes and every head's region offsets."""
        return self._impl.layout


class CudaTurboQuantCache(_DeviceCache):
    """One layer's turboquant_rvq cache of one sequence on a CUDA device, with the tensor-core
    decode (see the module doc).

    ``window`` > 0 makes it a sliding window, as ``SlidingWindowKVCache(cache, window,
    sink_tokens)`` on the CPU: a decode attends the first ``sink_tokens`` positions and the last
    ``window``, pages wholly between them go back to the pool as the cache grows, and only tokens
    still held can be dequantized (not with ``center_keys``: ``CudaKVCache`` serves those).
    Windows of one width and sinks batch (``CudaTurboQuantBatch``)."""

    _core_class = "CudaTurboQuantCache"

    def attend(self, queries: Any, scale: float | None = None, out: Any = None) -> Any:
        """Decode attention over every stored token, on the codes: one query per query head,
        queries [num_q_heads, head_dim] (or [num_q_heads, 1, head_dim], or [1, num_q_heads, 1,
        head_dim]); num_q_heads is 1..8 times num_heads (GQA). scale defaults to
        1/sqrt(head_dim). Returns a tensor shaped like the queries, in their dtype (or fills
        ``out``, a float32 tensor of that shape)."""
        torch = _torch()
        q = self._float32(queries, "queries")
        if out is not None:
            self._impl.attend(q, out, self._scale(scale), self._stream())
            return out
        result = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        self._impl.attend(q, result, self._scale(scale), self._stream())
        return self._in_dtype_of(result, queries)

    def __repr__(self) -> str:
        c = self.config
        return (f"CudaTurboQuantCache(bits={c.bits}, num_residuals={c.num_residuals}, "
                f"value_bits={c.value_bits}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"size={self.size}, max_seq_len={self.max_seq_len}{self._window_repr()}, "
                f"device={self.device})")


class _DeviceBatch:
    """What both batch classes share (see CudaTurboQuantBatch)."""

    _core_class: ClassVar[str]  # the _core class this wraps
    _cache_class: ClassVar[type]  # the cache class it batches

    def __init__(self) -> None:
        if not HAS_CUDA:
            raise RuntimeError(BUILT_WITHOUT_CUDA)
        self._impl = getattr(_core, self._core_class)()
        self.device: Any = None  # the caches' device, fixed by the first call

    def _cores(self, caches: Any) -> list[Any]:
        caches = list(caches)
        if not caches:
            raise ValueError("a batch needs at least one cache")
        for b, c in enumerate(caches):
            if not isinstance(c, self._cache_class):
                raise ValueError(f"cache {b} of the batch is a {type(c).__name__}, not a "
                                 f"{self._cache_class.__name__}")
        if self.device is None:
            self.device = caches[0].device
        if any(c.device != self.device for c in caches):
            raise ValueError(f"every cache of the batch must live on {self.device}")
        return [c._impl for c in caches]

    def alike(self, caches: Any) -> bool:
        """Whether attend can take these caches in one launch (see the subclasses)."""
        self._cores(caches)
        return True

    def append(self, caches: Any, keys: Any, values: Any) -> None:
        """Encodes keys and values [batch, num_heads, n, head_dim] (float32, float16 or
        bfloat16 on the caches' device), sequence b's into caches[b]. Warns as the caches'
        append does for centred caches left uncentred."""
        cores = self._cores(caches)
        first = caches[0]
        emptiest = min(c.size for c in caches)
        k = first._float32(keys, "keys")
        self._impl.append(cores, k, first._float32(values, "values"), first._stream())
        warn_if_left_uncentred(first.config.center_keys, emptiest, k.shape[-2])

    def attend(self, caches: Any, queries: Any, scale: float | None = None,
               out: Any = None) -> Any:
        """Decode attention of queries [batch, num_q_heads, head_dim], sequence b's over every
        token of caches[b]; returns a tensor shaped like the queries in their dtype (or fills
        ``out``, a float32 tensor of that shape). scale defaults to 1/sqrt(head_dim)."""
        cores = self._cores(caches)
        first = caches[0]
        q = first._float32(queries, "queries")
        result = _torch().empty(q.shape, dtype=_torch().float32, device=q.device) \
            if out is None else out
        self._impl.attend(cores, q, result, first._scale(scale), first._stream())
        return out if out is not None else first._in_dtype_of(result, queries)

    @property
    def nbytes(self) -> int:
        """Device bytes held: the batch's arrays (and, for the tuned kernel, its workspace)."""
        return self._impl.nbytes


class CudaTurboQuantBatch(_DeviceBatch):
    """The decode steps of a batch of sequences, one ``CudaTurboQuantCache`` each (one layer's
    caches made alike, e.g. by ``empty_like``)::

        step = CudaTurboQuantBatch()
        step.append(caches, keys, values)   # [batch, num_heads, n, head_dim]: sequence b's
                                            # tokens into caches[b], all or nothing
        out = step.attend(caches, queries)  # [batch, num_q_heads, head_dim], one launch

    One input check (and synchronization) covers every sequence's new tokens, and one fused
    decode launch attends over every sequence, each on its own cache's pages: the caches alone
    take one of each per sequence. The caches keep their tokens; this object holds only the
    device arrays that describe the batch and the decode's workspace. Errors are the caches'
    (ValueError naming the sequence, CapacityError), raised before any cache changes.
    """

    _core_class = "CudaTurboQuantBatch"
    _cache_class = CudaTurboQuantCache


class CudaKVCache(_DeviceCache):
    """One layer's cache of any method for one sequence on a CUDA device: decode and causal
    prefill attention on the codes (see the module doc for the scope).

    ``window`` > 0 makes it a sliding window, as ``SlidingWindowKVCache(cache, window,
    sink_tokens)`` on the CPU: a query at position q attends the first ``sink_tokens`` positions
    and (q - window, q]; pages wholly between them are given back to the cache's pool as it
    grows (device memory follows the window while ``size`` counts every position up to
    ``max_seq_len``), and only tokens still held can be dequantized. Windows of one width and
    sinks batch (``CudaKVCacheBatch``): each appends through its own pool, and one launch
    attends over all of them."""

    _core_class = "CudaCodecCache"

    @property
    def outlier_tokens(self) -> int:
        """Tokens held in the outlier side store, over every head (0 without an observer)."""
        return int(self._impl.outlier_tokens)

    def attend(self, queries: Any, scale: float | None = None, causal: bool = True,
               out: Any = None) -> Any:
        """Softmax attention over every stored token, on the codes. queries: [num_q_heads,
        n_queries, head_dim] (or with a leading batch dimension of 1), or [num_q_heads,
        head_dim] for one query per head; num_q_heads is a multiple of num_heads (query head h
        reads KV head h // (num_q_heads // num_heads)). With causal (the default), the queries
        are the last n_queries tokens appended and query i sees tokens [0, size - n_queries +
        i] (ValueError when fewer tokens are stored); without it every query sees every token.
        scale defaults to 1/sqrt(head_dim). Returns a tensor shaped like the queries, in their
        dtype (or fills ``out``, a float32 tensor of that shape); zeros when the cache is
        empty."""
        torch = _torch()
        q = self._float32(queries, "queries")
        result = torch.empty(q.shape, dtype=torch.float32, device=q.device) if out is None \
            else out
        target = result
        if q.ndim == 2:  # [num_q_heads, head_dim]: one query per head
            if result.shape != q.shape:
                raise ValueError(f"out must be shaped like the queries {list(q.shape)}, got "
                                 f"{list(result.shape)}")
            q, target = q.unsqueeze(1), result.unsqueeze(1)
        self._impl.attend(q, target, self._scale(scale), bool(causal), self._stream())
        return out if out is not None else self._in_dtype_of(result, queries)

    @property
    def method(self) -> str:
        return self.config.method

    def __repr__(self) -> str:
        c = self.config
        return (f"CudaKVCache(method={c.method!r}, bits={c.bits}, value_bits={c.value_bits}, "
                f"num_heads={self.num_heads}, head_dim={self.head_dim}, size={self.size}, "
                f"max_seq_len={self.max_seq_len}{self._window_repr()}, device={self.device})")


class CudaKVCacheBatch(_DeviceBatch):
    """The decode steps of a batch of sequences on the generic kernels, one ``CudaKVCache``
    each (one layer's caches made alike, e.g. by ``empty_like``): as ``CudaTurboQuantBatch``,
    one input check for every sequence's new tokens and one launch of each attention kernel
    (query state, attention, merge) for every sequence. ``alike(caches)`` tells whether the
    caches can attend together: one config, layer, shape and device, every codec trained. Codecs
    trained each on their own sequence (rabitq without calibrated centroids) batch too: each
    sequence is read with its own, as is each sequence's outlier side store."""

    _core_class = "CudaCodecBatch"
    _cache_class = CudaKVCache

    def alike(self, caches: Any) -> bool:
        """Whether ``attend`` can take these caches in one launch (one kind, codecs trained)."""
        return bool(_core.CudaCodecBatch.alike(self._cores(caches)))


__all__ = ["BUILT_WITHOUT_CUDA", "HAS_CUDA", "CudaKVCache", "CudaKVCacheBatch",
           "CudaTurboQuantBatch", "CudaTurboQuantCache", "is_available"]
