"""transformers integration: a ``transformers.Cache`` whose layers are VeloxQuant caches, and an
attention function (registered as ``attn_implementation="veloxquant"``) that computes
attention on the packed codes::

    from veloxquant.cache.base import KVCacheConfig
    from veloxquant.integrations.transformers import VeloxQuantCache

    model.set_attn_implementation("veloxquant")
    cache = VeloxQuantCache.from_model(model, KVCacheConfig(method="turboquant_rvq", bits=4))
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)

Each attention layer's ``Cache.update`` appends the new keys and values (after RoPE) to that
layer's VeloxQuant cache; the "veloxquant" attention function then runs the cache's fused
attention for the layer's queries (causal over the new tokens in prefill, over everything in
decode). Keys and values never exist in full precision on the transformers side: ``update``
hands the attention function zero-length views tagged with the layer. With
``fetch_dequantized=True`` it returns every stored token dequantized instead, so any other
attention implementation also works (the unfused path, for checking).

Limits of this build: batch size 1 without padding or explicit masks, inference only; the
caches run on the CPU, so tensors on a GPU are copied to the CPU and back at every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from ..cache.base import KVCache, KVCacheBuilder, KVCacheConfig
from ..cache.sliding_window_cache import SlidingWindowKVCache

ATTENTION_NAME = "veloxquant"
_TAG = "_veloxquant_layer"


def _cpu_float32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous()


class VeloxQuantLayer(CacheLayerMixin):
    """One model layer's cache: a VeloxQuant cache behind transformers' layer interface."""

    is_compileable = False
    is_croppable = True

    def __init__(self, cache: KVCache, fetch_dequantized: bool = False) -> None:
        super().__init__()
        self.cache = cache
        self.fetch_dequantized = fetch_dequantized
        self.is_sliding = isinstance(cache, SlidingWindowKVCache)
        self.batch_size = 1
        self._pending = False  # an update whose attention has not run yet

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends [1, kv_heads, n, head_dim] keys and values; returns tensors tagged with this
        layer for the "veloxquant" attention function (zero-length views, or every token
        dequantized with fetch_dequantized)."""
        if self._pending and not self.fetch_dequantized:
            raise RuntimeError(
                "the model's attention did not read the VeloxQuant cache: load the model with "
                f"attn_implementation={ATTENTION_NAME!r} (model.set_attn_implementation"
                f"({ATTENTION_NAME!r})), or build VeloxQuantCache(..., fetch_dequantized=True)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != 1:
            raise ValueError(
                f"VeloxQuantCache holds one sequence; got batch size {key_states.shape[0]}"
            )
        self.cache.append(_cpu_float32(key_states[0]), _cpu_float32(value_states[0]))
        if self.fetch_dequantized:
            k, v = self.cache.dequantize()
            keys = torch.from_numpy(k)[None].to(device=key_states.device, dtype=key_states.dtype)
            values = torch.from_numpy(v)[None].to(device=value_states.device, dtype=value_states.dtype)
        else:
            keys, values = key_states[..., :0, :], value_states[..., :0, :]
            self._pending = True
        setattr(keys, _TAG, self)
        return keys, values

    def attend(self, query: torch.Tensor, scaling: float, causal: bool) -> torch.Tensor:
        """Attention of [1, q_heads, n, head_dim] queries over this layer's codes, returned as
        [1, n, q_heads, head_dim] in the query's dtype and device."""
        self._pending = False
        out = self.cache.attend(_cpu_float32(query[0]), scale=scaling, causal=causal)
        return out.transpose(0, 1).unsqueeze(0).to(device=query.device, dtype=query.dtype)

    def get_seq_length(self) -> int:
        return self.cache.size

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.size + query_length, 0

    def get_max_length(self) -> int:
        return self.cache.max_seq_len

    def reset(self) -> None:
        self.cache.reset()
        self._pending = False

    def crop(self, tokens_to_remove: int) -> None:
        """Removes -tokens_to_remove tokens (transformers' current convention) or, for a
        positive value (the legacy one), crops to that many tokens."""
        if tokens_to_remove > 0:
            tokens_to_remove = -max(self.cache.size - tokens_to_remove, 0)
        if tokens_to_remove < 0:
            self.cache.trim(-tokens_to_remove)

    def offload(self) -> None:
        """Nothing to move: the codes live in host memory."""

    def prefetch(self) -> None:
        """Nothing to move: the codes live in host memory."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if beam_idx.numel() != 1 or int(beam_idx.reshape(-1)[0]) != 0:
            raise NotImplementedError("VeloxQuantCache holds one sequence: no beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise NotImplementedError("VeloxQuantCache holds one sequence (batch size 1)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.numel() != 1 or int(indices.reshape(-1)[0]) != 0:
            raise NotImplementedError("VeloxQuantCache holds one sequence (batch size 1)")


class VeloxQuantCache(Cache):
    """A transformers ``Cache`` holding one VeloxQuant cache per layer; pass it as
    ``past_key_values`` with ``attn_implementation="veloxquant"``."""

    def __init__(self, caches: Sequence[KVCache], fetch_dequantized: bool = False) -> None:
        """caches: one VeloxQuant cache per model layer, in layer order (e.g. from
        ``KVCacheBuilder.build``)."""
        if not caches:
            raise ValueError("VeloxQuantCache needs one cache per layer, got none")
        super().__init__(layers=[VeloxQuantLayer(c, fetch_dequantized) for c in caches])

    @classmethod
    def from_model(cls, model: Any, config: KVCacheConfig, max_seq_len: int = 8192,
                   fetch_dequantized: bool = False) -> VeloxQuantCache:
        """One cache per layer of a transformers model (``KVCacheBuilder.build``); layers the
        config marks "sliding_attention" get a SlidingWindowKVCache of ``sliding_window``
        tokens without sinks, as the model's own attention does."""
        caches = KVCacheBuilder.build(model, config, max_seq_len)
        cfg = getattr(model, "config", model)
        if callable(getattr(cfg, "get_text_config", None)):
            cfg = cfg.get_text_config(decoder=True)
        layer_types = getattr(cfg, "layer_types", None) or []
        window = getattr(cfg, "sliding_window", None)
        for i, kind in enumerate(layer_types[: len(caches)]):
            if kind == "sliding_attention" and window:
                caches[i] = SlidingWindowKVCache(caches[i], int(window), sink_tokens=0)
        return cls(caches, fetch_dequantized)

    @property
    def caches(self) -> list[KVCache]:
        """The VeloxQuant cache of every layer."""
        return [layer.cache for layer in self.layers]

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's cache (codes, scalars, page slack, parameters)."""
        return sum(layer.cache.nbytes for layer in self.layers)


def veloxquant_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: torch.Tensor | None,
                         scaling: float | None = None, dropout: float = 0.0,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The "veloxquant" attention function: attention of ``query`` [1, q_heads, n, head_dim]
    over the layer's compressed cache, which ``key`` (returned by ``VeloxQuantCache.update``)
    names. Returns ([1, n, q_heads, head_dim], None) as transformers expects."""
    layer = getattr(key, _TAG, None)
    if layer is None:
        raise ValueError(
            f"attn_implementation={ATTENTION_NAME!r} attends on a VeloxQuant cache: pass "
            "past_key_values=VeloxQuantCache(...) and use_cache=True"
        )
    if attention_mask is not None:
        raise ValueError(
            "veloxquant attention applies causal masking itself and cannot apply an explicit "
            "attention mask (batch size 1, no padding)"
        )
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window and not isinstance(layer.cache, SlidingWindowKVCache):
        raise ValueError(
            f"layer {getattr(module, 'layer_idx', '?')} uses sliding-window attention: build the "
            "cache with VeloxQuantCache.from_model (or wrap it in SlidingWindowKVCache)"
        )
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    return layer.attend(query, scaling, bool(causal)), None


AttentionInterface.register(ATTENTION_NAME, veloxquant_attention)

__all__ = ["ATTENTION_NAME", "VeloxQuantCache", "VeloxQuantLayer", "veloxquant_attention"]
