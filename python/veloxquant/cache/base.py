"""Configuration, factory and builder of VeloxQuant caches, and the cache base classes
(seed: ``veloxquant_mlx.cache.base``).

Every cache wraps one C++ cache of the core library (``veloxquant._core``): keys and values
are encoded into packed codes on ``append`` and attention runs on the codes (``attend``).
Arrays are ``[num_heads, n_tokens, head_dim]`` (queries ``[num_q_heads, n_queries,
head_dim]``), optionally with a leading batch dimension of 1; numpy float32/float16 arrays and
CPU torch tensors are accepted (float32 C-contiguous ones without a copy).
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy import ndarray

from .. import _core
from .._arrays import float_array, is_torch, output_array, query_array, token_array
from ..integrations.model_rope import with_model_rope
from ..observers.key_norm import KeyNormObserver


CENTER_MIN_TOKENS = _core.CENTER_MIN_TOKENS


def warn_if_left_uncentred(center_keys: bool, size: int, n_tokens: int) -> None:
    """A RuntimeWarning when a first append (size 0) of n_tokens is too short to estimate a
    center_keys cache's mean, which then stays zero (no centring) for the cache's life."""
    if center_keys and size == 0 and 0 < n_tokens < CENTER_MIN_TOKENS:
        warnings.warn(
            f"center_keys: the first append holds {n_tokens} tokens, fewer than the "
            f"{CENTER_MIN_TOKENS} the keys' mean is estimated from, so this cache's keys stay "
            "uncentred; append a prompt of at least that many tokens first",
            RuntimeWarning, stacklevel=3)


@dataclass
class KVCacheConfig:
    """A quantization configuration: the seed's dataclass, field for field.

    ``method`` is one of "turboquant_rvq", "vecinfer", "ratequant", "spectral", "rabitq",
    "qjl", "polarquant", "commvq" (and "fp16", the uncompressed baseline). ``bits`` is the key
    bit rate, ``value_bits`` the value bit rate (16 = fp16). ``codebook``/``smooth_factors``
    (vecinfer) and ``rotations`` (spectral) take numpy arrays; ``bit_allocation`` (ratequant)
    maps "L" or "L.H" to bits; ``outlier_observer`` routes tokens with extreme key norms to an
    ``outlier_bits`` side store. Two fields extend the seed and are normally filled from a
    calibration (``veloxquant.calibration``): ``ivf_centroids`` (rabitq, [layers][heads]
    [clusters][head_dim]) and ``rope_inv_freq`` (commvq: pair i of a key turns by
    position * rope_inv_freq[i]). ``center_keys`` (CPU caches) codes keys minus a per-head mean
    estimated at the first append, turned by ``rope_inv_freq`` where given (set it for a RoPE
    model); it is refused for commvq, vecinfer, spectral and calibrated rabitq. A first append
    of fewer than ``CENTER_MIN_TOKENS`` (16) tokens leaves that cache uncentred for its life
    (a RuntimeWarning says so): append a prompt of 16 tokens or more first.
    ``rope_half_split`` says how RoPE pairs coordinates: pair i is (i, i + P), P =
    len(rope_inv_freq), as transformers' rotate_half turns them, instead of (2i, 2i + 1), as GGUF
    Llama runtimes do (``VeloxQuantCache.from_model`` sets both for a transformers model; commvq
    refuses half-split pairs). Validation happens when a cache is made (``validate()`` runs it
    early); errors are ValueErrors carrying the C++ message.
    """

    method: str
    bits: int = 1
    value_bits: int = 2
    num_residuals: int = 2
    use_hadamard: bool = True
    codebook: ndarray | None = None
    smooth_factors: ndarray | None = None
    rotations: list | None = None
    bit_allocation: dict[str, int] | None = None
    outlier_observer: KeyNormObserver | None = None
    outlier_bits: int = 8
    sketch_dim: int = 64
    num_clusters: int = 64
    num_subspaces: int | None = None
    use_fused_sdpa: bool = True
    signal_bits: int = 4
    noise_bits: int = 1
    seed: int = 0
    ivf_centroids: ndarray | None = None
    rope_inv_freq: list[float] | None = None
    center_keys: bool = False
    rope_half_split: bool = False

    _INT_FIELDS: ClassVar[tuple[str, ...]] = (
        "bits", "value_bits", "num_residuals", "outlier_bits", "sketch_dim", "num_clusters",
        "signal_bits", "noise_bits",
    )

    def to_core(self) -> _core.KVCacheConfig:
        """The C++ configuration (arrays copied as float32)."""
        core = _core.KVCacheConfig()
        if not isinstance(self.method, str):
            raise ValueError(f"KVCacheConfig.method must be a string, got {self.method!r}")
        core.method = self.method
        for name in self._INT_FIELDS:
            setattr(core, name, _as_int(getattr(self, name), name))
        core.use_hadamard = bool(self.use_hadamard)
        core.use_fused_sdpa = bool(self.use_fused_sdpa)
        core.center_keys = bool(self.center_keys)
        core.rope_half_split = bool(self.rope_half_split)
        seed = _as_int(self.seed, "seed")
        if not 0 <= seed < 2**64:
            raise ValueError(f"KVCacheConfig.seed must be in [0, 2**64), got {seed}")
        core.seed = seed
        if self.num_subspaces is not None:
            core.num_subspaces = _as_int(self.num_subspaces, "num_subspaces")
        if self.codebook is not None:
            core.codebook = float_array(self.codebook, "codebook")
        if self.smooth_factors is not None:
            core.smooth_factors = float_array(self.smooth_factors, "smooth_factors")
        if self.rotations is not None:
            core.rotations = [float_array(r, "rotations") for r in self.rotations]
        if self.ivf_centroids is not None:
            core.ivf_centroids = float_array(self.ivf_centroids, "ivf_centroids")
        if self.rope_inv_freq is not None:
            core.rope_inv_freq = [float(x) for x in self.rope_inv_freq]
        if self.bit_allocation is not None:
            core.bit_allocation = {
                str(k): _as_int(v, f"bit_allocation[{k!r}]") for k, v in self.bit_allocation.items()
            }
        if self.outlier_observer is not None:
            if not isinstance(self.outlier_observer, KeyNormObserver):
                raise ValueError(
                    "KVCacheConfig.outlier_observer must be a veloxquant KeyNormObserver, got "
                    f"{type(self.outlier_observer).__name__}"
                )
            core.outlier_observer = self.outlier_observer
        return core

    @classmethod
    def from_core(cls, core: _core.KVCacheConfig) -> KVCacheConfig:
        """The dataclass for a C++ configuration (e.g. that of a loaded cache)."""
        rotations = list(core.rotations)
        allocation = dict(core.bit_allocation)
        return cls(
            method=core.method, bits=core.bits, value_bits=core.value_bits,
            num_residuals=core.num_residuals, use_hadamard=core.use_hadamard,
            codebook=core.codebook, smooth_factors=core.smooth_factors,
            rotations=rotations or None, bit_allocation=allocation or None,
            outlier_observer=core.outlier_observer, outlier_bits=core.outlier_bits,
            sketch_dim=core.sketch_dim, num_clusters=core.num_clusters,
            num_subspaces=core.num_subspaces, use_fused_sdpa=core.use_fused_sdpa,
            signal_bits=core.signal_bits, noise_bits=core.noise_bits, seed=core.seed,
            ivf_centroids=core.ivf_centroids, rope_inv_freq=list(core.rope_inv_freq) or None,
            center_keys=core.center_keys, rope_half_split=core.rope_half_split,
        )

    def validate(self) -> None:
        """Raises ValueError (the C++ message) for an unknown method or impossible setting."""
        self.to_core().validate()


def _as_int(value: Any, name: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"KVCacheConfig.{name} must be an integer, got {value!r}") from None


class KVCache:
    """One layer's compressed key/value cache (the interface every cache class shares).

    Construct one with ``KVCacheFactory.create`` or a method's class; ``KVCache.load`` reads a
    saved cache. A cache is not thread-safe for concurrent appends; ``append`` and ``attend``
    release the GIL.
    """

    _registry: ClassVar[dict[str, type[KVCache]]] = {}
    _impl: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        KVCache._registry[cls.__name__] = cls

    @classmethod
    def _wrap(cls, impl: Any) -> KVCache:
        """The Python cache of the class the C++ cache names, around impl."""
        obj = object.__new__(KVCache._registry[impl.class_name])
        obj._impl = impl
        return obj

    @property
    def _c(self) -> Any:
        impl = self.__dict__.get("_impl")
        if impl is None:
            raise ValueError(
                "this cache was moved into a SlidingWindowKVCache; use the window cache instead"
            )
        return impl

    # --- data -----------------------------------------------------------------------------
    def append(self, keys: Any, values: Any) -> None:
        """Encodes and stores new tokens: keys and values [num_heads, n, head_dim] (or
        [1, num_heads, n, head_dim]). Raises ValueError for bad shapes, NaN/Inf or, where the
        config stores them in fp16, magnitudes of 65520 and more, and CapacityError (a
        ValueError) past max_seq_len; a failed append changes nothing."""
        c = self._c
        k, _ = token_array(keys, "keys", c.num_heads, c.head_dim)
        v, _ = token_array(values, "values", c.num_heads, c.head_dim)
        if k.shape[1] != v.shape[1]:
            raise ValueError(
                f"keys hold {k.shape[1]} tokens but values hold {v.shape[1]}; they must match"
            )
        size = c.size
        c.append(k, v)
        if size == 0 and k.shape[1] < CENTER_MIN_TOKENS:  # (the config is read only then)
            warn_if_left_uncentred(c.config.center_keys, size, k.shape[1])

    def attend(self, queries: Any, scale: float | None = None, causal: bool = False,
               out: Any = None) -> Any:
        """Softmax attention of the queries over every stored token, computed on the codes.

        queries: [num_q_heads, n_queries, head_dim] (or with a batch dimension of 1);
        num_q_heads is a multiple of the KV heads (grouped-query attention: query head h reads
        KV head h // (num_q_heads // num_heads)). scale defaults to 1/sqrt(head_dim). With
        causal, the queries are the last n_queries tokens appended and query i sees tokens
        [0, size - n_queries + i]. Returns a new array of the queries' layout and kind (numpy,
        or a CPU torch tensor for torch queries), or fills and returns ``out``.
        """
        c = self._c
        q, batched = query_array(queries, c.num_heads, c.head_dim)
        result, target = output_array(out, q, batched)
        s = 1.0 / math.sqrt(c.head_dim) if scale is None else float(scale)
        c.attend(q, target, s, bool(causal))
        return result

    def dequantize(self, start: int = 0, n_tokens: int | None = None) -> tuple[ndarray, ndarray]:
        """Reconstructed (keys, values) of tokens [start, start + n_tokens) (default: to the
        end), each a numpy float32 [num_heads, n_tokens, head_dim]. IndexError outside the
        stored range."""
        c = self._c
        if n_tokens is None:
            n_tokens = c.size - start
        return c.dequantize(int(start), int(n_tokens))

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        """mlx_lm-style step: appends, then returns every stored token dequantized, in the
        input's layout (batched or not) and kind (numpy or torch). The unfused path; prefer
        ``attend``."""
        self.append(keys, values)
        k, v = self.dequantize()
        if is_torch(keys):
            import torch

            k, v = torch.from_numpy(k), torch.from_numpy(v)
        if np.ndim(keys) == 4:
            k, v = k[None], v[None]
        return k, v

    # --- state ----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Tokens appended (positions), including any a sliding window evicted."""
        return self._c.size

    @property
    def offset(self) -> int:
        """mlx_lm's name for ``size``."""
        return self._c.size

    def __len__(self) -> int:
        return self._c.size

    @property
    def max_seq_len(self) -> int:
        return self._c.max_seq_len

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, per-token scalars, page slack, side stores and codec
        parameters."""
        return self._c.nbytes

    @property
    def num_heads(self) -> int:
        return self._c.num_heads

    @property
    def head_dim(self) -> int:
        return self._c.head_dim

    @property
    def config(self) -> KVCacheConfig:
        return KVCacheConfig.from_core(self._c.config)

    @property
    def class_name(self) -> str:
        return self._c.class_name

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n_tokens: int) -> int:
        """Drops the last n_tokens tokens; returns n_tokens."""
        self._c.trim(int(n_tokens))
        return int(n_tokens)

    def reset(self) -> None:
        """Drops every token (trained state such as IVF centroids is kept)."""
        self._c.reset()

    def save(self, path: str | os.PathLike) -> None:
        """Writes a versioned, checksummed file atomically."""
        self._c.save(os.fspath(path))

    @staticmethod
    def load(path: str | os.PathLike) -> KVCache:
        """Reads a file written by ``save``; RuntimeError for a truncated, corrupted or forged
        file."""
        return KVCache._wrap(_core.load(os.fspath(path)))

    def __repr__(self) -> str:
        impl = self.__dict__.get("_impl")
        if impl is None:
            return f"<{type(self).__name__} (moved)>"
        return (
            f"<{type(self).__name__} method={impl.config.method!r} heads={impl.num_heads} "
            f"head_dim={impl.head_dim} size={impl.size}/{impl.max_seq_len} nbytes={impl.nbytes}>"
        )


class QuantizedKVCache(KVCache):
    """A cache whose keys go through ``method``'s codec and whose values go through the value
    codec (``value_bits``), stored bit-packed in pages of ``TOKENS_PER_PAGE`` tokens."""

    method: ClassVar[str | None] = None

    def __init__(self, config: KVCacheConfig, num_heads: int, head_dim: int,
                 max_seq_len: int = 8192, layer: int = 0) -> None:
        """A cache for layer ``layer`` of a model (the seeded rotations and sketches depend on
        it). config.method must be this class's method; QuantizedKVCache itself takes any
        method and becomes that method's class. ValueError (the C++ message) for a
        configuration the method cannot take."""
        if self.method is not None and config.method != self.method:
            raise ValueError(
                f"{type(self).__name__} needs method={self.method!r}, got {config.method!r} "
                "(KVCacheFactory.create picks the class from the method)"
            )
        self._impl = _core.create(config.to_core(), num_heads, head_dim, max_seq_len, layer)
        if type(self) is QuantizedKVCache:
            self.__class__ = KVCache._registry[self._impl.class_name]

    @property
    def layer(self) -> int:
        return self._c.layer

    def empty_like(self) -> QuantizedKVCache:
        """A new empty cache of the same class, config, shape, capacity and layer (so the same
        seeded rotations and sketches; a trained rabitq cache's centroids are not carried over
        unless the config holds them)."""
        return _create(self.config, self.num_heads, self.head_dim, self.max_seq_len, self.layer)

    @property
    def storage_bytes(self) -> int:
        """Packed storage: pages (codes, per-token scalars, slack) and the outlier store."""
        return self._c.storage_bytes

    @property
    def parameter_bytes(self) -> int:
        """Codec parameters: rotations, sketches, codebooks, centroids."""
        return self._c.parameter_bytes

    @property
    def key_bits_per_coordinate(self) -> float:
        """Exact key bits per coordinate (codes and per-token scalars, no page slack)."""
        return self._c.key_bits_per_coordinate

    @property
    def value_bits_per_coordinate(self) -> float:
        return self._c.value_bits_per_coordinate

    @property
    def outlier_tokens(self) -> int:
        """Tokens held in the outlier side store (all heads)."""
        return self._c.outlier_tokens

    def _take(self) -> Any:
        """Hands the C++ cache over (to a SlidingWindowKVCache); this object is unusable after."""
        impl = self._c
        self._impl = None
        return impl


class FP16KVCache(QuantizedKVCache):
    """Keys and values stored as IEEE fp16: the uncompressed baseline behind the same
    interface (method "fp16")."""

    method = "fp16"


class KVCacheFactory:
    """Maps a KVCacheConfig to a concrete cache (seed: ``KVCacheFactory``)."""

    @staticmethod
    def create(config: KVCacheConfig, num_heads: int, head_dim: int,
               max_seq_len: int = 8192) -> KVCache:
        """A single-layer cache of the class matching ``config.method``, holding up to
        ``max_seq_len`` tokens (memory grows page by page). ValueError for a bad config (the
        calibrated methods name the calibration they need)."""
        return _create(config, num_heads, head_dim, max_seq_len, 0)


def _create(config: KVCacheConfig, num_heads: int, head_dim: int, max_seq_len: int,
            layer: int) -> KVCache:
    if not isinstance(config, KVCacheConfig):
        raise ValueError(f"config must be a KVCacheConfig, got {type(config).__name__}")
    return KVCache._wrap(_core.create(config.to_core(), int(num_heads), int(head_dim),
                                      int(max_seq_len), int(layer)))


class KVCacheBuilder:
    """Makes one cache per layer of a model (seed: ``KVCacheBuilder``)."""

    @staticmethod
    def build(model: Any, config: KVCacheConfig, max_seq_len: int = 8192,
              calibration: Any = None) -> list[KVCache]:
        """One cache per transformer layer, each with that layer's KV-head count and head dim
        (and its layer index, for the seeded random objects and per-layer bit allocations).

        ``model`` may be a transformers model or config (``num_hidden_layers``,
        ``num_key_value_heads`` defaulting to ``num_attention_heads``, ``head_dim`` defaulting
        to ``hidden_size // num_attention_heads``; lists give per-layer values), an mlx_lm
        model (its ``args``), any object with a ``cache_shape()`` method or a ``layers`` list
        whose items have ``num_kv_heads`` and ``head_dim``, or a list of
        ``(num_kv_heads, head_dim)`` pairs.

        ``calibration`` (a ``veloxquant.calibration.Calibration`` or the path of a calibration
        file) fills ``config.method``'s calibrated fields first, after checking that it was made
        for a model of this shape (ValueError naming both otherwise).

        With ``config.center_keys`` and a torch model (transformers), the caches take the
        model's RoPE frequencies (unless the config has rope_inv_freq) and pairing
        (``rope_half_split``), as ``VeloxQuantCache.from_model`` does
        (``veloxquant.integrations.model_rope``).
        """
        shape = model_cache_shape(model)
        if not shape:
            raise ValueError("KVCacheBuilder: the model has no layers")
        if calibration is not None:
            from ..calibration import Calibration  # a module that imports this one

            cal = Calibration.load(calibration) if isinstance(calibration, (str, os.PathLike)) \
                else calibration
            if not isinstance(cal, Calibration):
                raise ValueError("calibration must be a veloxquant.calibration.Calibration or a "
                                 f"path, got {type(calibration).__name__}")
            cal.check_shape(shape)
            config = cal.apply(config)
        # A torch model's RoPE (frequencies, pairing) for center_keys; anything else unchanged.
        config = with_model_rope(model, config)
        return [_create(config, h, d, max_seq_len, layer) for layer, (h, d) in enumerate(shape)]


def model_cache_shape(model: Any) -> list[tuple[int, int]]:
    """(num_kv_heads, head_dim) of every attention layer of a model description (see
    ``KVCacheBuilder.build``)."""
    if isinstance(model, (list, tuple)):
        return [_layer_pair(item) for item in model]
    if callable(getattr(model, "cache_shape", None)):
        return [_layer_pair(item) for item in model.cache_shape()]
    for attr in ("config", "args"):
        cfg = getattr(model, attr, None)
        if cfg is not None and _looks_like_config(cfg):
            return _shape_from_config(cfg)
    if _looks_like_config(model):
        return _shape_from_config(model)
    layers = getattr(model, "layers", None)
    if layers is not None:
        return [_layer_pair(item) for item in layers]
    raise TypeError(
        f"cannot read the layer shapes of a {type(model).__name__}: pass a transformers model or "
        "config, an object with cache_shape() or layers, or a list of (num_kv_heads, head_dim)"
    )


def _layer_pair(item: Any) -> tuple[int, int]:
    if isinstance(item, (list, tuple)) and len(item) == 2:
        return int(item[0]), int(item[1])
    if hasattr(item, "num_kv_heads") and hasattr(item, "head_dim"):
        return int(item.num_kv_heads), int(item.head_dim)
    raise TypeError(f"a layer must be (num_kv_heads, head_dim) or have those attributes, got {item!r}")


def _looks_like_config(cfg: Any) -> bool:
    return hasattr(cfg, "num_hidden_layers") or hasattr(cfg, "get_text_config")


def _shape_from_config(cfg: Any) -> list[tuple[int, int]]:
    if callable(getattr(cfg, "get_text_config", None)):
        try:
            cfg = cfg.get_text_config(decoder=True)
        except TypeError:
            cfg = cfg.get_text_config()
    n_layers = int(cfg.num_hidden_layers)

    def per_layer(value: Any, name: str) -> list[Any]:
        if isinstance(value, (list, tuple)):
            if len(value) != n_layers:
                raise ValueError(f"config.{name} lists {len(value)} values for {n_layers} layers")
            return list(value)
        return [value] * n_layers

    heads = per_layer(cfg.num_attention_heads, "num_attention_heads")
    kv = getattr(cfg, "num_key_value_heads", None)
    kv_heads = per_layer(kv, "num_key_value_heads") if kv is not None else heads
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is not None:
        dims = per_layer(head_dim, "head_dim")
    else:
        dims = [int(cfg.hidden_size) // int(h) for h in heads]
    return [(int(kv_heads[i] if kv_heads[i] is not None else heads[i]), int(dims[i]))
            for i in range(n_layers)]
