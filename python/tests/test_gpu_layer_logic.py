"""The GPU layers of the transformers integration (VeloxQuantCudaLayer, VeloxQuantCudaKVLayer)
on stand-in caches that keep tokens exactly in CPU tensors: their bookkeeping (prefill chunks on
SDPA, decode on the cache, batches, padding, fetch_dequantized) checked against DynamicCache
anywhere torch runs, no GPU needed. Skipped without torch or transformers."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llama_models import tiny_llama as _tiny_llama  # noqa: E402

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


class _ExactKVCache(_ExactTokens, vq_cuda.CudaKVCache):
    """For VeloxQuantCudaKVLayer: prefill chunks on SDPA, decode ([hq, d] queries) on the
    cache."""

    def attend(self, queries, scale=None, causal=True, out=None):
        assert queries.dim() == 2 and queries.dtype == torch.float32
        return self._attend(queries[:, None], scale, False)[:, 0]


@pytest.mark.parametrize("kind", ["turboquant", "codec"])
def test_gpu_layer_batch_logic_on_exact_tokens(kind):
    """The GPU layers' batch bookkeeping on the stand-in: three sequences, two prefill chunks
    and decode steps give the default cache's logits row by row."""
    from transformers import DynamicCache

    from veloxquant.integrations.transformers import ATTENTION_NAME, VeloxQuantCache
    stand_in = {"turboquant": _ExactDeviceCache, "codec": _ExactKVCache}[kind]
    model = _tiny_llama(64)
    tokens = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(4))

    def run(cache, attention):
        model.set_attn_implementation(attention)
        try:
            with torch.no_grad():
                logits = [model(tokens[:, :12], past_key_values=cache, use_cache=True).logits,
                          model(tokens[:, 12:24], past_key_values=cache, use_cache=True).logits]
                for i in range(24, tokens.shape[1]):
                    logits.append(model(tokens[:, i:i + 1], past_key_values=cache, use_cache=True).logits)
        finally:
            model.set_attn_implementation("sdpa")
        return torch.cat(logits, dim=1).float()

    reference = run(DynamicCache(config=model.config), "sdpa")
    cache = VeloxQuantCache([stand_in(2, 64, layer=i) for i in range(2)])
    logits = run(cache, ATTENTION_NAME)
    assert [len(layer.rows) for layer in cache.layers] == [3, 3]
    assert [c.layer for c in cache.layers[1].rows] == [1, 1, 1]
    assert all(c.size == tokens.shape[1] for layer in cache.layers for c in layer.rows)
    err = ((logits - reference).abs().max() / reference.abs().max()).item()
    assert err < 1e-4, err
    # fetch_dequantized: the rows' tokens stacked for any attention implementation
    dequantized = VeloxQuantCache([stand_in(2, 64, layer=i) for i in range(2)],
                                  fetch_dequantized=True)
    err = ((run(dequantized, "sdpa") - reference).abs().max() / reference.abs().max()).item()
    assert err < 1e-4, err


@pytest.mark.parametrize("kind", ["turboquant", "codec"])
def test_gpu_layer_padding_logic_on_exact_tokens(kind):
    """A left-padded batch on the stand-in: two prefill chunks (the first mostly padding for
    the short sequence) and decode steps; each sequence stores only its own tokens and the
    logits at real positions equal DynamicCache's on the same padded batch."""
    from transformers import DynamicCache

    from veloxquant.integrations.transformers import ATTENTION_NAME, VeloxQuantCache
    stand_in = {"turboquant": _ExactDeviceCache, "codec": _ExactKVCache}[kind]
    model = _tiny_llama(64)
    tokens = torch.randint(0, 512, (2, 26), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(2, 26, dtype=torch.long)
    mask[1, :8] = 0  # the second sequence: 8 positions of left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def run(cache, attention):
        model.set_attn_implementation(attention)
        try:
            with torch.no_grad():
                logits = []
                for a, b in [(0, 12), (12, 20)] + [(i, i + 1) for i in range(20, 26)]:
                    logits.append(model(tokens[:, a:b], attention_mask=mask[:, :b],
                                        position_ids=positions[:, a:b], past_key_values=cache,
                                        use_cache=True).logits)
        finally:
            model.set_attn_implementation("sdpa")
        return torch.cat(logits, dim=1).float()

    reference = run(DynamicCache(config=model.config), "sdpa")
    cache = VeloxQuantCache([stand_in(2, 64, layer=i) for i in range(2)])
    logits = run(cache, ATTENTION_NAME)
    assert [c.size for c in cache.layers[0].rows] == [26, 18] and cache.layers[0].pads == [0, 8]
    assert cache.get_seq_length() == 26
    real = mask.bool()
    err = ((logits[real] - reference[real]).abs().max() / reference[real].abs().max()).item()
    assert err < 1e-4, err


@pytest.mark.parametrize("kind", ["turboquant", "codec"])
def test_gpu_layer_logic_on_exact_tokens(kind):
    """The GPU layers' bookkeeping on a stand-in cache that stores tokens exactly: two prefill
    chunks (SDPA, the second over the earlier tokens plus the chunk) and decode steps (the
    cache's attend) give the default cache's logits."""
    from transformers import DynamicCache

    from veloxquant.integrations.transformers import (ATTENTION_NAME, VeloxQuantCache,
                                                      VeloxQuantCudaKVLayer, VeloxQuantCudaLayer)
    stand_in, layer_class = {"turboquant": (_ExactDeviceCache, VeloxQuantCudaLayer),
                             "codec": (_ExactKVCache, VeloxQuantCudaKVLayer)}[kind]
    model = _tiny_llama(64)
    tokens = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(2))

    def run(cache, attention):
        model.set_attn_implementation(attention)
        try:
            with torch.no_grad():
                logits = [model(tokens[:, :16], past_key_values=cache, use_cache=True).logits[0],
                          model(tokens[:, 16:30], past_key_values=cache, use_cache=True).logits[0]]
                for i in range(30, tokens.shape[1]):
                    logits.append(model(tokens[:, i:i + 1], past_key_values=cache, use_cache=True).logits[0])
        finally:
            model.set_attn_implementation("sdpa")
        return torch.cat(logits).float()

    reference = run(DynamicCache(config=model.config), "sdpa")
    cache = VeloxQuantCache([stand_in(2, 64, layer=i) for i in range(2)])
    assert all(type(layer) is layer_class for layer in cache.layers)
    logits = run(cache, ATTENTION_NAME)
    assert cache.get_seq_length() == tokens.shape[1]
    err = ((logits - reference).abs().max() / reference.abs().max()).item()
    assert err < 1e-4, err
    # fetch_dequantized: any attention implementation reads every token from the cache
    dequantized = VeloxQuantCache([stand_in(2, 64, layer=i) for i in range(2)],
                                  fetch_dequantized=True)
    err = ((run(dequantized, "sdpa") - reference).abs().max() / reference.abs().max()).item()
    assert err < 1e-4, err
    # the model's own attention never reading the codes is reported
    misuse = VeloxQuantCache([stand_in(2, 64, layer=i) for i in range(2)])
    with torch.no_grad():
        model(tokens[:, :4], past_key_values=misuse, use_cache=True)
        with pytest.raises(RuntimeError, match="attn_implementation='veloxquant'"):
            model(tokens[:, 4:5], past_key_values=misuse, use_cache=True)
