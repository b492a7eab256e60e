"""transformers integration: a ``transformers.Cache`` whose layers are VeloxQuant caches, and an
attention function (registered as ``attn_implementation="veloxquant"``) that computes
attention on the packed codes::

    from veloxquant.cache.base import KVCacheConfig
    from veloxquant.integrations.transformers import VeloxQuantCache

    model.set_attn_implementation("veloxquant")
    cache = VeloxQuantCache.from_model(model, KVCacheConfig(method="turboquant_rvq", bits=4))
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)

(transformers 5.25 renamed ``past_key_values`` to ``cache``; the old name still works there, with
a FutureWarning.)

Each attention layer's ``Cache.update`` hands the new keys and values (after RoPE) to the
"veloxquant" attention function, as zero-length views tagged with the layer; that function
stores them in the layer's VeloxQuant cache (leaving out padding, which it reads from the
mask) and runs the cache's fused attention for the layer's queries (causal over the new tokens
in prefill, over everything in decode). Keys and values are not kept in full precision on the
transformers side. With ``fetch_dequantized=True`` ``update`` stores them at once and returns
every stored token dequantized (a sliding window's from the earliest position its next queries
reach, as ``get_mask_sizes`` says, since it may have evicted those before), so any other
attention implementation also works (the unfused path, for checking).

On the GPU: when the model is on a CUDA device and the extension was built with the CUDA
backend (``VQ_CUDA=ON``), ``VeloxQuantCache.from_model`` (``backend="auto"``) keeps each
layer's codes on the device, in one of two caches of ``veloxquant.cuda``:

- ``CudaTurboQuantCache`` (``VeloxQuantCudaLayer``) when the layer is in the tuned TurboQuant
  kernels' scope (turboquant_rvq with the Hadamard rotation, head_dim 64 or 128, key bits 1..4
  with 1..3 stages, value_bits 1, 2, 4 or 16, 1..8 query heads per KV head);
- otherwise ``CudaKVCache`` (``VeloxQuantCudaKVLayer``) for any method (including
  turboquant_rvq out of the kernels' scope, e.g. without the Hadamard rotation or at another
  head_dim) with head_dim up to 256. The calibrated methods (vecinfer, spectral, commvq;
  rabitq's centroids optionally) take their fields from the KVCacheConfig, as on the CPU;
  rabitq without centroids trains on its first append.

On both, decode (one new token) appends the token and attends on the packed codes (the
tensor-core kernel, or the generic one). Prefill (a chunk of several tokens) does NOT attend on
the codes: it runs torch ``scaled_dot_product_attention`` (causal, GQA) on the chunk's exact
keys and values, preceded by the dequantized earlier tokens when the chunk is not the first,
and then appends the chunk; so the first prefill chunk attends exactly as the uncompressed
model does and compression shows from the first decoded token on. (``CudaKVCache.attend`` with
``causal=True`` is the fused causal prefill on the codes, for callers that want it; on long
prompts it is several times slower than SDPA: 3.4-4.7 ms (turboquant 1-bit / 2-bit, fp16, qjl,
rabitq) against 0.96 for a 512-query chunk
over 32K tokens on an H100, docs/cuda.md.)

Sliding-window layers (the config's "sliding_attention" layers) get either cache with that
window and no sinks: it decodes on the codes as above (``CudaTurboQuantCache`` on its general
kernels), gives evicted pages back to its pool, and a batch's decode step runs in one launch
there too. A ``CudaKVCache`` window stores each prefill chunk first and attends it on the codes
within the window (as a CPU ``SlidingWindowKVCache`` layer does); a ``CudaTurboQuantCache``
window, whose kernels decode only, runs SDPA over the window's earlier tokens (dequantized) and
the chunk's exact ones, in blocks of queries with a window mask, and then stores the chunk.
An outlier observer puts a layer on a ``CudaKVCache`` (its side store on the device), whose
batches decode in one launch too. A layer out of both caches' scope (head_dim over 256, say)
stays on the CPU, and ``from_model`` warns (a RuntimeWarning naming such layers and why).
``backend="cuda"`` insists on the GPU for every layer and ``backend="cpu"`` never uses it. On a
GPU layer nothing leaves the GPU; each append (a batch's decode step or unpadded prefill chunk:
once for all, where the layer's batch takes its sequences together) synchronizes once (its input
check: NaN, Inf, or magnitudes fp16 storage cannot hold, so that bad input raises before anything
is stored), as does a rabitq cache's training; a padded batch's mask is read on the host once a
forward.

Batches: a batch of B sequences gets B caches per layer (the given one and B - 1 made by its
``empty_like()`` on the first update of that batch size), each attending on its own sequence.
On the GPU a decode step of the whole batch (no padding in the step) runs as one: one input
check and synchronization for every sequence's token and one decode launch over every
sequence's pages (``veloxquant.cuda.CudaTurboQuantBatch``, ``CudaKVCacheBatch``; codecs that
learned from each sequence's own tokens, rabitq's centroids, are read per sequence); prefill
chunks take the sequences one by one.
Padded batches work: transformers builds sdpa's boolean mask for this attention, a position no
query may attend to is padding, and each sequence stores and attends only its own tokens (so
its cache holds no padding; ``get_seq_length`` counts transformers' positions). The tokens of
an update are stored when its attention runs. Beam search and any other reordering that would
copy a sequence's cache are refused (``batch_select_indices`` with distinct indices works).

Limits of this build: inference only; masks other than causal, sliding-window and padding ones
are not applied; layers whose caches run on the CPU copy tensors on a GPU to the CPU and back
at every layer.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import cuda as _cuda
from ..cache.base import KVCache, KVCacheBuilder, KVCacheConfig, _create, model_cache_shape
from ..cache.sliding_window_cache import SlidingWindowKVCache
from ..cuda import CudaKVCache, CudaKVCacheBatch, CudaTurboQuantBatch, CudaTurboQuantCache
from .model_rope import with_model_rope

ATTENTION_NAME = "veloxquant"
_TAG = "_veloxquant_layer"


def _cpu_float32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _read_real_positions(mask: torch.Tensor, n: int) -> torch.Tensor | None:
    """Which of the last n key positions of `mask` (transformers' [batch or 1, 1, n_q, n_k],
    boolean or additive) some query attends to, as a [batch or 1, n] bool tensor on the host;
    None where every one is. A position no query attends to is padding. On a GPU this waits
    for the device."""
    attended = mask if mask.dtype == torch.bool else mask == 0  # additive: 0 where attended
    real = attended[:, 0, :, attended.shape[-1] - n:].any(dim=1).to("cpu")
    return None if bool(real.all()) else real


# The last mask _real_positions read (a weak reference to it), its version counter and the n it
# was read for, and what it gave.
_last_mask_read: tuple[weakref.ref, int, int, torch.Tensor | None] | None = None


def _real_positions(mask: torch.Tensor, n: int) -> torch.Tensor | None:
    """_read_real_positions, once per mask tensor: transformers hands every layer of a forward
    the same mask, so the answer for the last mask read is kept while that tensor lives,
    unchanged (its version counter), and a forward reads it (and waits for its device) once
    instead of once per layer."""
    global _last_mask_read
    if _last_mask_read is not None:
        ref, version, read_n, real = _last_mask_read
        if ref() is mask and mask._version == version and read_n == n:
            return real
    real = _read_real_positions(mask, n)
    _last_mask_read = (weakref.ref(mask), mask._version, n, real)
    return real


class VeloxQuantLayer(CacheLayerMixin):
    """One model layer's cache: a VeloxQuant cache behind transformers' layer interface (one per
    sequence of a batch)."""

    is_compileable = False
    is_croppable = True

    def __init__(self, cache: KVCache, fetch_dequantized: bool = False) -> None:
        super().__init__()
        self.cache = cache  # the first sequence's
        self.rows: list[Any] = [cache]  # one cache per sequence of the batch
        self.pads: list[int] = [0]  # per sequence: masked (padding) positions not stored
        self.fetch_dequantized = fetch_dequantized
        self.is_sliding = isinstance(cache, SlidingWindowKVCache)
        self._pending = False  # an update whose attention has not run yet
        self._incoming: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _begin_update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The checks every update starts with (the previous update's attention ran; the batch
        size), the lazy initialisation, and one cache per sequence."""
        if self._pending and not self.fetch_dequantized:
            raise RuntimeError(
                "the model's attention did not read the VeloxQuant cache: load the model with "
                f"attn_implementation={ATTENTION_NAME!r} (model.set_attn_implementation"
                f"({ATTENTION_NAME!r})), or build VeloxQuantCache(..., fetch_dequantized=True)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch = key_states.shape[0]
        if batch != len(self.rows):
            if self.get_seq_length() > 0:
                raise ValueError(
                    f"VeloxQuantCache holds {len(self.rows)} sequences with tokens; got a batch "
                    f"of {batch} (reset the cache before changing the batch size)"
                )
            self.rows = self.rows[:batch] + [self.cache.empty_like()
                                             for _ in range(batch - len(self.rows))]
            self.cache = self.rows[0]
            self.pads = [0] * batch

    def _cache_input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x ([heads, n, head_dim]) as the cache takes it: float32, contiguous, on the CPU."""
        return _cpu_float32(x)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes [batch, kv_heads, n, head_dim] keys and values; returns tensors tagged with
        this layer for the "veloxquant" attention function, which stores each sequence's
        unpadded tokens in its cache and attends (zero-length views). With fetch_dequantized
        every token is stored now (padding too: the caller's attention masks it) and every
        stored token comes back dequantized."""
        self._begin_update(key_states, value_states)
        if self.fetch_dequantized:
            offset = self._window_offset()
            for b, cache in enumerate(self.rows):
                cache.append(self._cache_input(key_states[b], "keys"),
                             self._cache_input(value_states[b], "values"))
            keys, values = self._dequantized_rows(key_states.dtype, offset)
            keys, values = keys.to(key_states.device), values.to(value_states.device)
        else:
            self._incoming = (key_states, value_states)
            keys, values = key_states[..., :0, :], value_states[..., :0, :]
            self._pending = True
        setattr(keys, _TAG, self)
        return keys, values

    def _dequantized_rows(self, dtype: torch.dtype,
                          start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's stored tokens from position `start` on, stacked: [batch, kv_heads,
        size - start, head_dim]."""
        rows = [c.dequantize(start) for c in self.rows]
        keys = torch.stack([torch.as_tensor(k) for k, _ in rows]).to(dtype)
        values = torch.stack([torch.as_tensor(v) for _, v in rows]).to(dtype)
        return keys, values

    def _take_incoming(self, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                 torch.Tensor | None]:
        """The update's keys and values, and which of their n positions each sequence stores
        ([batch, n] bool; None: all of them): a position no query may attend to is padding."""
        if self._incoming is None:
            raise RuntimeError(f"{type(self).__name__}.attend: no update() for this step")
        keys, values = self._incoming
        self._incoming, self._pending = None, False
        n = keys.shape[-2]
        real = None if mask is None else _real_positions(mask, n)
        if real is None:
            return keys, values, None
        real = real.expand(len(self.rows), n)
        for b, row in enumerate(real):
            self.pads[b] += n - int(row.sum())
        return keys, values, real

    def attend(self, query: torch.Tensor, scaling: float, causal: bool,
               key: torch.Tensor | None = None, value: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Stores the update's tokens (each sequence's unpadded ones in its cache, padding told
        by `mask`) and returns the attention of [batch, q_heads, n, head_dim] queries over each
        sequence's codes as [batch, n, q_heads, head_dim] in the query's dtype and device
        (padding positions give zeros)."""
        if self.fetch_dequantized:  # update stored the tokens and returned them all
            return _sdpa(query, key, value, scaling, causal, mask)
        keys, values, real = self._take_incoming(mask)
        out = torch.zeros(query.shape[0], query.shape[1], query.shape[2], query.shape[3],
                          dtype=torch.float32)
        for b, cache in enumerate(self.rows):
            k, v, q = keys[b], values[b], query[b]
            if real is not None:
                k, v, q = k[:, real[b]], v[:, real[b]], q[:, real[b]]
            if k.shape[1] > 0:
                cache.append(self._cache_input(k, "keys"), self._cache_input(v, "values"))
            if q.shape[1] > 0:
                result = torch.as_tensor(cache.attend(self._cache_input(q, "queries"),
                                                      scale=scaling, causal=causal))
                if real is None:
                    out[b] = result
                else:
                    out[b][:, real[b]] = result
        return out.transpose(1, 2).to(device=query.device, dtype=query.dtype)

    def get_seq_length(self) -> int:
        """Positions in transformers' timeline: stored tokens plus skipped padding."""
        return self.cache.size + self.pads[0]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        offset = self._window_offset()
        return self.get_seq_length() + query_length - offset, offset

    def _window_offset(self) -> int:
        """With fetch_dequantized on a sliding window, the first position update returns and the
        model's mask counts from (as transformers' own sliding layers do): the earliest that the
        next queries' windows reach, which the window still holds once they are stored; the
        tokens before it may be evicted. 0 otherwise."""
        if not (self.fetch_dequantized and self.is_sliding):
            return 0
        return max(0, self.get_seq_length() - self.cache.window + 1)

    def get_max_length(self) -> int:
        return self.cache.max_seq_len

    def reset(self) -> None:
        for cache in self.rows:
            cache.reset()
        self.pads = [0] * len(self.rows)
        self._pending, self._incoming = False, None

    def crop(self, tokens_to_remove: int) -> None:
        """Removes -tokens_to_remove tokens (transformers' current convention) or, for a
        positive value (the legacy one), crops to that many tokens; from every sequence."""
        if tokens_to_remove > 0:
            tokens_to_remove = -max(self.get_seq_length() - tokens_to_remove, 0)
        if tokens_to_remove < 0:
            for cache in self.rows:
                cache.trim(-tokens_to_remove)

    def offload(self) -> None:
        """Nothing to move: the codes live in host memory."""

    def prefetch(self) -> None:
        """Nothing to move: the codes live in host memory."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Only the identity: a reordering that copies one sequence's cache to another (beam
        search) is not supported."""
        if beam_idx.reshape(-1).tolist() != list(range(len(self.rows))):
            raise NotImplementedError(
                "VeloxQuantCache does not copy a sequence's cache to another: no beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Nothing to copy while the caches are empty (the batch grows on the next update);
        repeating stored sequences is not supported."""
        if repeats != 1 and self.get_seq_length() > 0:
            raise NotImplementedError(
                "VeloxQuantCache does not copy a sequence's cache: expand the inputs instead")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the sequences at `indices` (distinct), in that order."""
        picked = [int(i) for i in indices.reshape(-1).tolist()]
        if len(set(picked)) != len(picked) or not all(0 <= i < len(self.rows) for i in picked):
            raise NotImplementedError(
                f"VeloxQuantCache selects distinct sequences of its {len(self.rows)}; got {picked}")
        self.rows = [self.rows[i] for i in picked]
        self.pads = [self.pads[i] for i in picked]
        if self.rows:
            self.cache = self.rows[0]


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
          causal: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, q_heads, n_q, d] queries over [batch, kv_heads, n_k, d] keys and values: with
    `mask` (transformers' [batch, 1, n_q, n_k]) as it says, else causal with the queries the
    last n_q of the n_k tokens; returns [batch, n_q, q_heads, d]."""
    n_q, n_k = query.shape[2], key.shape[2]
    is_causal = False
    if mask is None and causal and n_q > 1:
        if n_q == n_k:
            is_causal = True
        else:
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril(n_k - n_q)
    key, value = key.to(query.dtype), value.to(query.dtype)
    group = query.shape[1] // key.shape[1]
    if group > 1:  # explicit GQA, so that the fused SDPA backends (flash, efficient) apply
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling)
    return out.transpose(1, 2)


def _window_sdpa(caches: Sequence[Any], query: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, scaling: float, causal: bool,
                 block: int = 1024) -> torch.Tensor:
    """SDPA of a prefill chunk of sliding-window caches (one per sequence, alike and of one
    size) not yet holding it: [batch, q_heads, n, d] queries at positions size..size + n - 1
    over each cache's sinks and the window's earlier tokens (dequantized; all still held) and
    the chunk's [batch, kv_heads, n, d] keys and values. Query q attends positions below the
    sinks and in (q - window, q] (causal; else up to the chunk's last position). In blocks of
    `block` queries, so that no mask exceeds block x (sinks + window + block). Returns
    [batch, n, q_heads, d]."""
    first = caches[0]
    start, window, sinks = first.size, first.window, first.sink_tokens
    n, device = query.shape[2], query.device
    earliest = max(0, start - window + 1)  # the first query's window (and every later one's)
    parts_k, parts_v, ranges = [], [], []
    for lo, hi in ((0, min(sinks, earliest)), (earliest, start)):
        if hi > lo:
            rows = [cache.dequantize(lo, hi - lo) for cache in caches]
            parts_k.append(torch.stack([k for k, _ in rows]).to(keys.dtype))
            parts_v.append(torch.stack([v for _, v in rows]).to(values.dtype))
            ranges.append((lo, hi))
    ranges.append((start, start + n))
    keys_all = torch.cat(parts_k + [keys], dim=-2)
    values_all = torch.cat(parts_v + [values], dim=-2)
    positions = torch.cat([torch.arange(lo, hi, device=device) for lo, hi in ranges])
    outs = []
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        limits = (torch.arange(start + i0, start + i1, device=device) + 1 if causal
                  else torch.full((i1 - i0,), start + n, device=device))  # positions < limit
        keep = (positions < sinks) | ((positions >= int(limits.min()) - window)
                                      & (positions < int(limits.max())))
        p = positions[keep]
        mask = (p[None, :] < limits[:, None]) & (
            (p[None, :] >= limits[:, None] - window) | (p[None, :] < sinks))
        outs.append(_sdpa(query[:, :, i0:i1], keys_all[:, :, keep], values_all[:, :, keep],
                          scaling, False, mask[None, None]))
    return torch.cat(outs, dim=1)


class VeloxQuantDeviceLayer(VeloxQuantLayer):
    """What the GPU layers share: a device cache of ``veloxquant.cuda`` per sequence, fed
    float32 tensors on its own device, where its codes stay. Decode (one new token) stores the
    token and attends on the codes; a prefill chunk runs SDPA on its exact keys and values
    (after the earlier tokens, dequantized) and is then stored (see the module doc)."""

    # Where set, what takes a whole batch's decode step at once (made on the first such step).
    _batch_class: type | None = None
    _batch: Any = None

    def __init__(self, cache: CudaTurboQuantCache | CudaKVCache,
                 fetch_dequantized: bool = False) -> None:
        super().__init__(cache, fetch_dequantized)  # type: ignore[arg-type]
        self.is_sliding = _is_window(cache)

    def _batched_steps(self) -> bool:
        """Whether this layer's sequences take a decode step together (its batch class, made
        on first use, finds their caches alike)."""
        if self._batch_class is None:
            return False
        if self._batch is None:
            self._batch = self._batch_class()
        return self._batch.alike(self.rows)

    def _cache_input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x as float32 and contiguous on the cache's device (ValueError on another device)."""
        if x.device != self.cache.device:
            raise ValueError(f"layer {self.cache.layer}: {name} are on {x.device} but the cache "
                             f"lives on {self.cache.device}")
        # (.to(memory_format=...) returns a float32 view unchanged, strides and all)
        return x.to(torch.float32).contiguous()

    def attend(self, query: torch.Tensor, scaling: float, causal: bool,
               key: torch.Tensor | None = None, value: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, q_heads, n, head_dim] queries -> [batch, n, q_heads, head_dim]. One token:
        stored, then the fused decode on each sequence's codes. A prefill chunk: SDPA over the
        earlier tokens (dequantized) and the chunk's exact keys and values, causal (query i is
        token size - n + i), then stored. Padding (told by `mask`) is neither stored nor
        attended; its positions give zeros."""
        if self.fetch_dequantized:  # update stored the tokens and returned them all
            return _sdpa(query, key, value, scaling, causal, mask)
        keys, values, real = self._take_incoming(mask)
        n = keys.shape[-2]
        if n == 1 and real is None and len(self.rows) > 1 and self._batched_steps():
            # a decode step of every sequence: one input check and one decode launch for all
            self._batch.append(self.rows, self._cache_input(keys, "keys"),
                               self._cache_input(values, "values"))
            result = self._batch.attend(self.rows, query[:, :, 0, :].to(torch.float32).contiguous(),
                                        scale=scaling)  # [batch, q_heads, head_dim] float32
            return result.unsqueeze(1).to(query.dtype)
        # (a sliding window's chunks attend on the codes, each sequence alone, unless its cache
        # is the tuned one, whose prefill runs SDPA within the window)
        codes_window = self.is_sliding and not isinstance(self.cache, CudaTurboQuantCache)
        if n == 1 or real is not None or len({c.size for c in self.rows}) > 1 or codes_window:
            out = torch.zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3],
                              dtype=query.dtype, device=query.device)
            for b, cache in enumerate(self.rows):
                sel = slice(None) if real is None else real[b].to(query.device)
                k, v, q = keys[b][:, sel], values[b][:, sel], query[b][:, sel]
                if n == 1 and k.shape[1] == 1:
                    cache.append(self._cache_input(k, "keys"), self._cache_input(v, "values"))
                    result = cache.attend(q[:, 0, :].to(torch.float32).contiguous(),
                                          scale=scaling)  # [q_heads, head_dim] float32
                    out[b, 0] = result.to(query.dtype)
                elif k.shape[1] > 0:
                    out[b, sel] = self._prefill(cache, q[None], k, v, scaling, causal)[0]
            return out
        if self.is_sliding:  # the tuned cache's window (every sequence of one size)
            out = _window_sdpa(self.rows, query, keys, values, scaling, causal)
        else:
            start = self.cache.size
            keys_all, values_all = keys, values
            if start > 0:
                earlier_k, earlier_v = self._dequantized_rows(keys.dtype)
                keys_all = torch.cat([earlier_k, keys], dim=-2)
                values_all = torch.cat([earlier_v, values], dim=-2)
            out = _sdpa(query, keys_all, values_all, scaling, causal)
        self._store(keys, values)
        return out

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Stores every sequence's chunk ([batch, kv_heads, n, head_dim]): through the layer's
        batch where its sequences take steps together (one input check; all or nothing: bad
        input in one sequence leaves every cache as it was), else one cache after another."""
        if len(self.rows) > 1 and self._batched_steps():
            self._batch.append(self.rows, self._cache_input(keys, "keys"),
                               self._cache_input(values, "values"))
            return
        for b, cache in enumerate(self.rows):
            cache.append(self._cache_input(keys[b], "keys"), self._cache_input(values[b], "values"))

    def _prefill(self, cache: Any, query: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, scaling: float, causal: bool) -> torch.Tensor:
        """One sequence's prefill chunk ([1, q_heads, n, d] queries, [kv_heads, n, d] keys):
        SDPA over its earlier tokens and the chunk, then the chunk stored. A sliding window's
        chunk on a CudaKVCache is stored first and attends on the codes (its window and sinks,
        as on the CPU: the tokens it evicted are gone); on a CudaTurboQuantCache (decode kernels
        only) SDPA takes the window's earlier tokens, dequantized, and the chunk's exact ones
        (_window_sdpa), and the chunk is stored after."""
        if self.is_sliding and isinstance(cache, CudaTurboQuantCache):
            out = _window_sdpa([cache], query, keys[None], values[None], scaling, causal)
            cache.append(self._cache_input(keys, "keys"), self._cache_input(values, "values"))
            return out
        if self.is_sliding:
            cache.append(self._cache_input(keys, "keys"), self._cache_input(values, "values"))
            out = cache.attend(query[0].to(torch.float32).contiguous(), scale=scaling,
                               causal=causal)  # [q_heads, n, d] float32
            return out.transpose(0, 1)[None].to(query.dtype)
        keys_all, values_all = keys, values
        if cache.size > 0:
            earlier_k, earlier_v = cache.dequantize()
            keys_all = torch.cat([earlier_k.to(keys.dtype), keys], dim=-2)
            values_all = torch.cat([earlier_v.to(values.dtype), values], dim=-2)
        out = _sdpa(query, keys_all[None], values_all[None], scaling, causal)
        cache.append(self._cache_input(keys, "keys"), self._cache_input(values, "values"))
        return out

    def offload(self) -> None:
        """Nothing to move: the codes stay on their device."""

    def prefetch(self) -> None:
        """Nothing to move: the codes stay on their device."""


class VeloxQuantCudaKVLayer(VeloxQuantDeviceLayer):
    """One model layer's cache on the GPU in a ``CudaKVCache`` (any method): decode runs the
    generic fused attention on the codes, for a batch in one launch of each kernel where the
    sequences' codecs are alike (``CudaKVCacheBatch``)."""

    _batch_class = CudaKVCacheBatch


class VeloxQuantCudaLayer(VeloxQuantDeviceLayer):
    """One model layer's cache on the GPU in a ``CudaTurboQuantCache``: decode runs the
    tensor-core turboquant kernel on the codes, for a batch in one launch
    (``CudaTurboQuantBatch``)."""

    _batch_class = CudaTurboQuantBatch


class VeloxQuantCache(Cache):
    """A transformers ``Cache`` holding one VeloxQuant cache per layer; pass it as
    ``past_key_values`` with ``attn_implementation="veloxquant"``."""

    def __init__(self, caches: Sequence[KVCache | CudaTurboQuantCache | CudaKVCache],
                 fetch_dequantized: bool = False) -> None:
        """caches: one cache per model layer, in layer order (e.g. from ``KVCacheBuilder.build``);
        a ``veloxquant.cuda.CudaTurboQuantCache`` or ``CudaKVCache`` makes that layer a GPU
        layer."""
        if not caches:
            raise ValueError("VeloxQuantCache needs one cache per layer, got none")
        super().__init__(layers=[_layer_of(c, fetch_dequantized) for c in caches])

    @classmethod
    def from_model(cls, model: Any, config: KVCacheConfig, max_seq_len: int = 8192,
                   fetch_dequantized: bool = False, backend: str = "auto") -> VeloxQuantCache:
        """One cache per layer of a transformers model (``KVCacheBuilder.build``); layers the
        config marks "sliding_attention" get a SlidingWindowKVCache of ``sliding_window``
        tokens without sinks, as the model's own attention does.

        backend: "auto" keeps a layer's codes on the GPU when the model's parameters are on a
        CUDA device, this build has the CUDA backend and the layer is in its scope (see the
        module doc: ``CudaTurboQuantCache`` where its kernels apply, else ``CudaKVCache``), else
        on the CPU; "cuda" requires the GPU for every layer (ValueError/RuntimeError naming the
        reason otherwise); "cpu" never uses it.

        With ``config.center_keys`` the caches take the model's RoPE: its rotary embedding's
        inv_freq (unless the config has rope_inv_freq) and its pairing (``rope_half_split``,
        probed from the modeling module's rotate_half). On the GPU both ``CudaTurboQuantCache``
        and ``CudaKVCache`` take center_keys at head_dim up to 128; wider heads then stay on the
        CPU ("cuda" raises)."""
        if backend not in ("auto", "cuda", "cpu"):
            raise ValueError(f"backend must be 'auto', 'cuda' or 'cpu', got {backend!r}")
        config = with_model_rope(model, config)
        cfg = getattr(model, "config", model)
        if callable(getattr(cfg, "get_text_config", None)):
            cfg = cfg.get_text_config(decoder=True)
        layer_types = list(getattr(cfg, "layer_types", None) or [])
        window = getattr(cfg, "sliding_window", None)
        device = _model_device(model)
        if backend != "cpu":
            reason = _cuda_unavailable_reason(device)
            if reason and backend == "cuda":
                raise RuntimeError(f"VeloxQuantCache backend='cuda': {reason}")
            if not reason:
                shape = model_cache_shape(model)
                q_heads = _query_heads(cfg, len(shape))
                caches: list[Any] = []
                on_cpu: list[str] = []
                for layer, (h, d) in enumerate(shape):
                    sliding = layer < len(layer_types) and layer_types[layer] == "sliding_attention"
                    cache, why = _device_cache(config, h, d, q_heads[layer], max_seq_len, layer,
                                               device, int(window) if sliding and window else 0)
                    if cache is None:
                        if backend == "cuda":
                            raise ValueError(f"layer {layer} is outside the CUDA backend: {why}")
                        on_cpu.append(f"layer {layer}: {why}")
                        cache = _create(config, h, d, max_seq_len, layer)
                        if sliding and window:
                            cache = SlidingWindowKVCache(cache, int(window), sink_tokens=0)
                    caches.append(cache)
                if on_cpu:  # the model is on the GPU: these layers' attention runs on the host
                    warnings.warn(
                        f"VeloxQuantCache: {len(on_cpu)} of {len(shape)} layers keep their codes "
                        f"on the CPU, so their attention runs on the host ({'; '.join(on_cpu[:3])}"
                        f"{'; ...' if len(on_cpu) > 3 else ''}); backend='cuda' refuses such a "
                        "config instead", RuntimeWarning, stacklevel=2)
                return cls(caches, fetch_dequantized)
        caches = KVCacheBuilder.build(model, config, max_seq_len)
        for i, kind in enumerate(layer_types[: len(caches)]):
            if kind == "sliding_attention" and window:
                caches[i] = SlidingWindowKVCache(caches[i], int(window), sink_tokens=0)
        return cls(caches, fetch_dequantized)

    @property
    def devices(self) -> list[str]:
        """Where each layer's codes live: "cpu" or "cuda:N"."""
        return [str(layer.cache.device) if isinstance(layer, VeloxQuantDeviceLayer) else "cpu"
                for layer in self.layers]

    @property
    def caches(self) -> list[KVCache]:
        """The VeloxQuant cache of every layer (the first sequence's, in a batch)."""
        return [layer.cache for layer in self.layers]

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's caches, every sequence's (codes, scalars, page slack,
        parameters; on the GPU the page pool as allocated, the codec tables and the decode
        workspace)."""
        batches = [getattr(layer, "_batch", None) for layer in self.layers]
        return (sum(cache.nbytes for layer in self.layers for cache in layer.rows)
                + sum(batch.nbytes for batch in batches if batch is not None))


def _layer_of(cache: Any, fetch_dequantized: bool) -> VeloxQuantLayer:
    """The transformers layer for one VeloxQuant cache (on the GPU for the device caches)."""
    if isinstance(cache, CudaTurboQuantCache):
        return VeloxQuantCudaLayer(cache, fetch_dequantized)
    if isinstance(cache, CudaKVCache):
        return VeloxQuantCudaKVLayer(cache, fetch_dequantized)
    return VeloxQuantLayer(cache, fetch_dequantized)


def _is_window(cache: Any) -> bool:
    """Whether a layer's cache is a sliding window (on the CPU or the GPU)."""
    return isinstance(cache, SlidingWindowKVCache) or (
        isinstance(cache, (CudaKVCache, CudaTurboQuantCache)) and cache.window > 0)


def _device_cache(config: KVCacheConfig, kv_heads: int, head_dim: int, q_heads: int | None,
                  max_seq_len: int, layer: int, device: torch.device,
                  window: int) -> tuple[CudaTurboQuantCache | CudaKVCache | None, str]:
    """The GPU cache of one layer (a sliding window's where window > 0, without sinks): a
    CudaTurboQuantCache where its kernels apply, else a CudaKVCache; (None, why) when neither
    does."""
    if q_heads is not None and q_heads % kv_heads != 0:
        return None, f"{q_heads} query heads are not a multiple of the {kv_heads} KV heads"
    shape = (config, kv_heads, head_dim, max_seq_len, layer, device)
    if q_heads is None or q_heads // kv_heads <= 8:  # the tensor-core decode's GQA groups
        try:
            return CudaTurboQuantCache(*shape, window=window, sink_tokens=0), ""
        except ValueError:  # out of the tuned kernels' scope (method, bits, head_dim, centring)
            pass
    try:
        return CudaKVCache(*shape, window=window, sink_tokens=0), ""
    except ValueError as e:  # out of the device codecs' scope (head_dim, config)
        return None, str(e)


def _model_device(model: Any) -> torch.device | None:
    parameters = getattr(model, "parameters", None)
    if not callable(parameters):
        return None
    try:
        return next(parameters()).device
    except StopIteration:
        return None


def _cuda_unavailable_reason(device: torch.device | None) -> str:
    if device is None or device.type != "cuda":
        return f"the model is on {device or 'no device'}, not on a CUDA device"
    if not _cuda.HAS_CUDA:
        return _cuda.BUILT_WITHOUT_CUDA
    if not _cuda.is_available():
        return "no CUDA device is visible to the CUDA backend"
    return ""


def _query_heads(cfg: Any, n_layers: int) -> list[int | None]:
    heads = getattr(cfg, "num_attention_heads", None)
    if isinstance(heads, (list, tuple)):
        return [int(h) for h in heads]
    return [int(heads) if heads is not None else None] * n_layers


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
            "past_key_values=VeloxQuantCache(...) (cache=... in newer transformers) and "
            "use_cache=True"
        )
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window and not _is_window(layer.cache):
        raise ValueError(
            f"layer {getattr(module, 'layer_idx', '?')} uses sliding-window attention: build the "
            "cache with VeloxQuantCache.from_model (or wrap it in SlidingWindowKVCache)"
        )
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    return layer.attend(query, scaling, bool(causal), key, value, attention_mask), None


AttentionInterface.register(ATTENTION_NAME, veloxquant_attention)
# transformers builds sdpa's boolean mask for this attention (none where the caches' own causal
# masking is all there is), from which the layers learn which positions are padding.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)

__all__ = ["ATTENTION_NAME", "VeloxQuantCache", "VeloxQuantCudaKVLayer", "VeloxQuantCudaLayer",
           "VeloxQuantDeviceLayer", "VeloxQuantLayer", "veloxquant_attention"]
