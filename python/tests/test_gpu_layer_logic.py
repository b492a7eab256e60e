"""The GPU layers of the transformers integration (VeloxQuantCudaLayer, VeloxQuantCudaKVLayer)
on stand-in caches that keep tokens exactly in CPU tensors: their bookkeeping (prefill chunks on
SDPA, decode on the cache, a batch's decode steps at once, padding, fetch_dequantized) checked
against DynamicCache anywhere torch runs, no GPU needed. Skipped without torch or
transformers."""

import functools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llama_models import tiny_llama as _tiny_llama  # noqa: E402
from llama_models import tiny_sliding_qwen2  # noqa: E402

from veloxquant import CapacityError  # noqa: E402
from veloxquant import cuda as vq_cuda  # noqa: E402


class _ExactTokens:
    """Exact float32 tokens in torch tensors on the CPU, standing in for a device cache: it lets
    the GPU layers' logic run anywhere torch does."""

    def __init__(self, num_heads, head_dim, max_seq_len=1024, layer=0):  # noqa: D107
        self.device, self.layer, self.config = torch.device("cpu"), layer, None
        self.k = torch.zeros(num_heads, 0, head_dim)
        self.v = torch.zeros(num_heads, 0, head_dim)
        self._max = max_seq_len

    def append(self, keys, values):
        assert keys.dtype == torch.float32 and keys.is_contiguous() and keys.dim() == 3
        if self.size + keys.shape[1] > self._max:
            raise CapacityError("max_seq_len")
        self.k, self.v = torch.cat([self.k, keys], 1), torch.cat([self.v, values], 1)

    def _attend(self, queries, scale, causal):
        """[hq, n, d] queries, the last n tokens when causal."""
        group = queries.shape[0] // self.num_heads
        k = self.k.repeat_interleave(group, 0)
        v = self.v.repeat_interleave(group, 0)
        s = torch.einsum("hqd,htd->hqt", queries, k) * scale
        if causal:
            n = queries.shape[1]
            s = s.masked_fill(~torch.ones(n, self.size, dtype=torch.bool).tril(self.size - n),
                              float("-inf"))
        return torch.einsum("hqt,htd->hqd", torch.softmax(s, -1), v)

    def empty_like(self):
        return type(self)(self.num_heads, self.head_dim, self._max, self.layer)

    def dequantize(self, start=0, n_tokens=None):
        n = self.size - start if n_tokens is None else n_tokens
        return self.k[:, start:start + n].clone(), self.v[:, start:start + n].clone()

    def trim(self, n_tokens):
        n = min(n_tokens, self.size)
        self.k, self.v = self.k[:, :self.size - n], self.v[:, :self.size - n]
        return n

    def reset(self):
        self.trim(self.size)

    window = 0  # no sliding window: the layers ask every cache
    size = property(lambda self: self.k.shape[1])
    num_heads = property(lambda self: self.k.shape[0])
    head_dim = property(lambda self: self.k.shape[2])
    max_seq_len = property(lambda self: self._max)
    nbytes = property(lambda self: 2 * self.k.numel() * 4)


class _ExactDeviceCache(_ExactTokens, vq_cuda.CudaTurboQuantCache):
    """For VeloxQuantCudaLayer: prefill chunks on SDPA, decode on the cache."""

    def attend(self, queries, scale=None, out=None):
        assert queries.dim() == 2 and queries.dtype == torch.float32
        return self._attend(queries[:, None], scale, False)[:, 0]


class _ExactBatch:
    """Stands in for CudaTurboQuantBatch and CudaKVCacheBatch over the stand-in caches: a
    batch's decode step, one sequence after the other."""

    nbytes = 0

    def alike(self, caches):
        return True

    def append(self, caches, keys, values):
        assert keys.dim() == 4 and keys.shape[0] == len(caches) and keys.dtype == torch.float32
        for cache, k, v in zip(caches, keys, values):
            cache.append(k, v)

    steps = 0  # attend calls, over every instance

    def attend(self, caches, queries, scale=None):
        assert queries.dim() == 3 and queries.shape[0] == len(caches)
        _ExactBatch.steps += 1
        return torch.stack([cache.attend(q, scale) for cache, q in zip(caches, queries)])


@pytest.fixture(autouse=True)
def _exact_batch(monkeypatch):
    """The GPU layers take a batch's decode step through _ExactBatch."""
    from veloxquant.integrations.transformers import VeloxQuantCudaKVLayer, VeloxQuantCudaLayer
    monkeypatch.setattr(VeloxQuantCudaLayer, "_batch_class", _ExactBatch)
    monkeypatch.setattr(VeloxQuantCudaKVLayer, "_batch_class", _ExactBatch)


class _ExactKVCache(_ExactTokens, vq_cuda.CudaKVCache):
    """For VeloxQuantCudaKVLayer: prefill chunks on SDPA, decode ([hq, d] queries) on the
    cache."""

    def attend(self, queries, scale=None, causal=True, out=None):
        assert queries.dim() == 2 and queries.dtype == torch.float32
        return self._attend(queries[:, None], scale, False)[:, 0]


def _logits(model, cache, attention, tokens, cuts, mask=None):
    """Logits [batch, n, vocab] of `tokens` fed as prefill chunks ending at `cuts`, then one
    token per step; with a padding `mask`, positions counted over each sequence's own tokens
    (as generate does)."""
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    model.set_attn_implementation(attention)
    try:
        with torch.no_grad():
            logits, a = [], 0
            for b in list(cuts) + list(range(cuts[-1] + 1, tokens.shape[1] + 1)):
                extra = {} if mask is None else {"attention_mask": mask[:, :b],
                                                 "position_ids": positions[:, a:b]}
                logits.append(model(tokens[:, a:b], past_key_values=cache, use_cache=True,
                                    **extra).logits)
                a = b
    finally:
        model.set_attn_implementation("sdpa")
    return torch.cat(logits, dim=1).float()


def _relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["turboquant", "codec"])
def test_gpu_layer_logic_on_exact_tokens(kind, batch):
    """The GPU layers' bookkeeping on a stand-in cache that stores tokens exactly: two prefill
    chunks (SDPA, the second over the earlier tokens plus the chunk) and decode steps (the
    cache's attend) give the default cache's logits, for one sequence or a batch (one cache per
    sequence and layer, made by empty_like)."""
    from transformers import DynamicCache

    from veloxquant.integrations.transformers import (ATTENTION_NAME, VeloxQuantCache,
                                                      VeloxQuantCudaKVLayer, VeloxQuantCudaLayer)
    stand_in, layer_class = {"turboquant": (_ExactDeviceCache, VeloxQuantCudaLayer),
                             "codec": (_ExactKVCache, VeloxQuantCudaKVLayer)}[kind]
    model = _tiny_llama(64)
    tokens = torch.randint(0, 512, (batch, 48), generator=torch.Generator().manual_seed(2))
    cuts = (16, 30)

    reference = _logits(model, DynamicCache(config=model.config), "sdpa", tokens, cuts)
    cache = VeloxQuantCache([stand_in(2, 64, layer=i) for i in range(2)])
    assert all(type(layer) is layer_class for layer in cache.layers)
    logits = _logits(model, cache, ATTENTION_NAME, tokens, cuts)
    assert cache.get_seq_length() == tokens.shape[1]
    assert [[c.layer for c in layer.rows] for layer in cache.layers] == [[0] * batch, [1] * batch]
    assert all(c.size == tokens.shape[1] for layer in cache.layers for c in layer.rows)
    # a batch's decode steps went through the layers' batch, at once
    assert all(isinstance(layer._batch, _ExactBatch) == (batch > 1) for layer in cache.layers)
    assert _relative_error(logits, reference) < 1e-4
    # fetch_dequantized: any attention implementation reads every token from the cache
    dequantized = VeloxQuantCache([stand_in(2, 64, layer=i) for i in range(2)],
                                  fetch_dequantized=True)
    assert _relative_error(_logits(model, dequantized, "sdpa", tokens, cuts), reference) < 1e-4
    # the model's own attention never reading the codes is reported
    misuse = VeloxQuantCache([stand_in(2, 64, layer=i) for i in range(2)])
    with torch.no_grad():
        model(tokens[:, :4], past_key_values=misuse, use_cache=True)
        with pytest.raises(RuntimeError, match="attn_implementation='veloxquant'"):
            model(tokens[:, 4:5], past_key_values=misuse, use_cache=True)


@pytest.mark.parametrize("kind", ["turboquant", "codec"])
def test_gpu_layer_padding_logic_on_exact_tokens(kind, monkeypatch):
    """A left-padded batch on the stand-in: two prefill chunks (the first mostly padding for
    the short sequence) and decode steps; each sequence stores only its own tokens and the
    logits at real positions equal DynamicCache's on the same padded batch. The decode steps
    (every sequence's token real) go through the batch at once, and each forward reads its
    mask on the host once, not once per layer (on a GPU each read waits for the device)."""
    from transformers import DynamicCache

    import veloxquant.integrations.transformers as integration
    from veloxquant.integrations.transformers import ATTENTION_NAME, VeloxQuantCache
    stand_in = {"turboquant": _ExactDeviceCache, "codec": _ExactKVCache}[kind]
    model = _tiny_llama(64)
    tokens = torch.randint(0, 512, (2, 26), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(2, 26, dtype=torch.long)
    mask[1, :8] = 0  # the second sequence: 8 positions of left padding
    cuts = (12, 20)

    reference = _logits(model, DynamicCache(config=model.config), "sdpa", tokens, cuts, mask)
    reads = []
    read = integration._read_real_positions
    monkeypatch.setattr(integration, "_read_real_positions",
                        lambda m, n: reads.append(n) or read(m, n))
    _ExactBatch.steps = 0
    cache = VeloxQuantCache([stand_in(2, 64, layer=i) for i in range(2)])
    logits = _logits(model, cache, ATTENTION_NAME, tokens, cuts, mask)
    decode_steps = tokens.shape[1] - cuts[-1]
    assert reads == [12, 8] + [1] * decode_steps  # one read a forward, of its new positions
    assert _ExactBatch.steps == 2 * decode_steps  # both layers' decode steps as one batch
    assert [c.size for c in cache.layers[0].rows] == [26, 18] and cache.layers[0].pads == [0, 8]
    assert cache.get_seq_length() == 26
    real = mask.bool()
    assert _relative_error(logits[real], reference[real]) < 1e-4


def test_a_mask_is_read_once_while_it_lives():
    """_real_positions: the positions of a boolean or additive mask that some query attends to
    (None when all are), the answer kept for the same tensor, unchanged, and n only."""
    from veloxquant.integrations.transformers import _real_positions
    mask = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    mask[1, :, :, :2] = False  # sequence 1: two positions of padding
    real = _real_positions(mask, 4)
    assert real.device.type == "cpu" and real.tolist() == [[True] * 4, [False, True, True, True]]
    assert _real_positions(mask, 4) is real
    assert _real_positions(mask, 3) is None  # the last 3 positions are real in both
    assert _real_positions(mask, 4) is not real and _real_positions(mask, 4).equal(real)
    mask[0, :, :, 4] = False  # changed in place: read again
    assert _real_positions(mask, 4).tolist() == [[True, True, True, False],
                                                [False, True, True, True]]
    mask[0, :, :, 4] = True
    additive = torch.zeros(2, 1, 3, 5).masked_fill(~mask, float("-inf"))
    assert _real_positions(additive, 5).tolist() == [[True] * 5, [False, False] + [True] * 3]


def test_a_layer_the_tuned_cache_refuses_takes_the_generic_cache(monkeypatch):
    """On a GPU below sm_80 CudaTurboQuantCache refuses at construction (ValueError); the layer
    then gets a CudaKVCache, as for configs outside the tuned kernels' scope. Stand-ins for both
    classes: no GPU needed."""
    import veloxquant.integrations.transformers as integration
    from veloxquant.cache.base import KVCacheConfig

    made = []

    class Refuses:
        def __init__(self, *args, **kwargs):
            raise ValueError("CUDA backend: the tuned decode needs compute capability 8.0 or "
                             "newer, this device has 7.5 (CudaCodecCache serves it)")

    class Generic:
        def __init__(self, *args, **kwargs):
            made.append((args, kwargs))

    monkeypatch.setattr(integration, "CudaTurboQuantCache", Refuses)
    monkeypatch.setattr(integration, "CudaKVCache", Generic)
    config = KVCacheConfig(method="turboquant_rvq", bits=2)
    cache, why = integration._device_cache(config, 2, 64, 4, 128, 0, torch.device("cpu"), 0)
    assert isinstance(cache, Generic) and why == ""
    shape = (config, 2, 64, 128, 0, torch.device("cpu"))
    assert made == [(shape, {"window": 0, "sink_tokens": 0})]
    # a sliding layer's: its window, no sinks
    integration._device_cache(config, 2, 64, 4, 128, 0, torch.device("cpu"), 24)
    assert made[-1] == (shape, {"window": 24, "sink_tokens": 0})


class _ExactWindowDeviceCache(_ExactDeviceCache):
    """A sliding window of the last `window` positions (no sinks) over exact tokens, for a
    VeloxQuantCudaLayer's sliding layer: decode attends the window; dequantize refuses what the
    tuned cache may have evicted (positions before the next token's window)."""

    window, sink_tokens = 24, 0
    reads = []  # (start, n) of every dequantize, over every instance

    def attend(self, queries, scale=None, out=None):
        group = queries.shape[0] // self.num_heads
        k = self.k[:, -self.window:].repeat_interleave(group, 0)
        v = self.v[:, -self.window:].repeat_interleave(group, 0)
        s = torch.einsum("hd,htd->ht", queries, k) * scale
        return torch.einsum("ht,htd->hd", torch.softmax(s, -1), v)

    def dequantize(self, start=0, n_tokens=None):
        n = self.size - start if n_tokens is None else n_tokens
        assert start >= self.size + 1 - self.window, (start, self.size)
        _ExactWindowDeviceCache.reads.append((start, n))
        return super().dequantize(start, n)


@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_sliding_layer_logic_on_exact_tokens(monkeypatch, batch):
    """A sliding layer on the tuned cache (decode kernels only): its prefill chunks run SDPA over
    the window's earlier tokens (dequantized) and the chunk's exact ones with the window's mask,
    in blocks of queries (7 here, so that a chunk takes several), then the chunk is stored (a
    batch's sequences at once, through the layer's batch); decode attends the cache's window.
    On exact stand-in tokens a tiny Qwen2 (window 24 on its first layer) gives its own full
    forward's logits (transformers' sliding mask), through three chunks, two of them longer than
    the window, and decode steps, for one sequence or three."""
    import veloxquant.integrations.transformers as integration
    from veloxquant.integrations.transformers import ATTENTION_NAME, VeloxQuantCache
    monkeypatch.setattr(integration, "_window_sdpa",
                        functools.partial(integration._window_sdpa, block=7))
    model = tiny_sliding_qwen2()
    tokens = torch.randint(0, 512, (batch, 90), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(tokens, use_cache=False).logits.float()
    cache = VeloxQuantCache([_ExactWindowDeviceCache(2, 64, layer=0),
                             _ExactDeviceCache(2, 64, layer=1)])
    assert cache.layers[0].is_sliding and not cache.layers[1].is_sliding
    _ExactWindowDeviceCache.reads.clear()
    logits = _logits(model, cache, ATTENTION_NAME, tokens, (30, 35, 70))
    assert _relative_error(logits, reference) < 1e-4
    # the second and third chunks read the earlier tokens of their first query's window
    assert _ExactWindowDeviceCache.reads == [(7, 23)] * batch + [(12, 23)] * batch
    assert all(c.size == 90 for layer in cache.layers for c in layer.rows)
