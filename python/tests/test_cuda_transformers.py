"""The transformers integration's GPU layers (VeloxQuantCache.from_model with backend="cuda"):
chunked prefills and decode steps of a tiny Llama against the default cache, centred keys on
the GPU, batches, and the generic device caches against the CPU layers. Skipped without torch,
transformers, a CUDA-enabled build (VQ_CUDA=ON) or a CUDA device, except the check that
backend="cuda" names what it needs."""

import pytest

from veloxquant import KeyNormObserver
from veloxquant import cuda as vq_cuda
from veloxquant.cache.base import KVCacheConfig

from cuda_support import needs_cuda, rel, torch
from llama_models import tiny_llama as _tiny_llama
from llama_models import tiny_sliding_qwen2


def _chunked_logits(model, cache, attention, tokens, first, prompt):
    """The logits of one sequence run as a prefill chunk [0, first), a second chunk [first,
    prompt) (on the GPU layers: SDPA over the dequantized earlier tokens and this chunk), then
    one decode step a token, with `attention` as the model's implementation."""
    model.set_attn_implementation(attention)
    try:
        with torch.no_grad():
            logits = [model(tokens[:, :first], past_key_values=cache, use_cache=True).logits[0],
                      model(tokens[:, first:prompt], past_key_values=cache, use_cache=True).logits[0]]
            for i in range(prompt, tokens.shape[1]):
                logits.append(model(tokens[:, i:i + 1], past_key_values=cache, use_cache=True).logits[0])
    finally:
        model.set_attn_implementation("sdpa")
    return torch.cat(logits).float().cpu()


@needs_cuda
def test_transformers_gpu_layers_follow_the_default_cache():
    pytest.importorskip("transformers")
    from transformers import DynamicCache

    from veloxquant.integrations.transformers import (ATTENTION_NAME, VeloxQuantCache,
                                                      VeloxQuantCudaLayer)
    model = _tiny_llama(64).to("cuda")
    tokens = torch.randint(0, 512, (1, 72), generator=torch.Generator().manual_seed(1)).cuda()

    def run(cache, attention):
        return _chunked_logits(model, cache, attention, tokens, 24, 40)

    reference = run(DynamicCache(config=model.config), "sdpa")
    config = KVCacheConfig(method="turboquant_rvq", bits=4, num_residuals=3, value_bits=16)
    cache = VeloxQuantCache.from_model(model, config, max_seq_len=256)
    assert all(isinstance(layer, VeloxQuantCudaLayer) for layer in cache.layers)
    assert cache.devices == ["cuda:0", "cuda:0"]
    logits = run(cache, ATTENTION_NAME)
    assert cache.get_seq_length() == tokens.shape[1]
    err = ((logits - reference).abs().max() / reference.abs().max()).item()
    assert err < 0.05, err
    # The first 24 positions come from exact SDPA on the first chunk: equal to the default's.
    assert ((logits[:24] - reference[:24]).abs().max() / reference.abs().max()).item() < 1e-4
    # backend="cpu" keeps every layer on the CPU even with the model on the GPU.
    cpu = VeloxQuantCache.from_model(model, config, max_seq_len=256, backend="cpu")
    assert cpu.devices == ["cpu", "cpu"]

    # A layer out of the device caches' scope: auto falls back to the CPU, saying so, and cuda
    # refuses.
    from veloxquant.integrations import transformers as integration
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(integration, "_device_cache", lambda *args: (None, "out of scope here"))
        with pytest.warns(RuntimeWarning, match="2 of 2 layers keep their codes on the CPU"):
            assert VeloxQuantCache.from_model(model, config).devices == ["cpu", "cpu"]
        with pytest.raises(ValueError, match="outside the CUDA backend: out of scope here"):
            VeloxQuantCache.from_model(model, config, backend="cuda")
    # crop / reset on GPU layers
    cache.crop(-4)
    assert cache.get_seq_length() == tokens.shape[1] - 4
    cache.reset()
    assert cache.get_seq_length() == 0


@needs_cuda
def test_transformers_centred_keys_stay_on_the_gpu():
    """from_model with center_keys: the tuned layers and CudaKVCache layers take it on the GPU
    with the model's RoPE, and a chunked prefill and decode follow the default cache, centred or
    not, at the near-exact config of test_transformers_gpu_layers_follow_the_default_cache (at
    3-bit keys and 4-bit values this random model's logits are off by 0.7-0.8 of their largest
    either way), and with fp16 codes of the centred keys on the generic kernels."""
    pytest.importorskip("transformers")
    from transformers import DynamicCache

    from veloxquant.integrations.transformers import (ATTENTION_NAME, VeloxQuantCache,
                                                      VeloxQuantCudaKVLayer, VeloxQuantCudaLayer)
    model = _tiny_llama(64).to("cuda")
    tokens = torch.randint(0, 512, (1, 120), generator=torch.Generator().manual_seed(4)).cuda()

    def run(cache, attention):
        return _chunked_logits(model, cache, attention, tokens, 64, 96)

    reference = run(DynamicCache(config=model.config), "sdpa")
    errors = {}
    for centred in (False, True):
        config = KVCacheConfig(method="turboquant_rvq", bits=4, num_residuals=3, value_bits=16,
                               center_keys=centred)
        cache = VeloxQuantCache.from_model(model, config, max_seq_len=256, backend="cuda")
        assert all(isinstance(layer, VeloxQuantCudaLayer) for layer in cache.layers)
        logits = run(cache, ATTENTION_NAME)
        errors[centred] = ((logits - reference).abs().max() / reference.abs().max()).item()
    codec = KVCacheConfig(method="fp16", value_bits=16, center_keys=True)
    cache = VeloxQuantCache.from_model(model, codec, max_seq_len=256, backend="cuda")
    assert all(isinstance(layer, VeloxQuantCudaKVLayer) and
               isinstance(layer.cache, vq_cuda.CudaKVCache) for layer in cache.layers)
    logits = run(cache, ATTENTION_NAME)
    errors["fp16"] = ((logits - reference).abs().max() / reference.abs().max()).item()
    assert max(errors.values()) < 0.05, errors


@needs_cuda
def test_transformers_gpu_layers_take_a_batch():
    """Two sequences on the tuned layers: one device cache per sequence and layer, chunked
    prefill and decode following DynamicCache on the same batch."""
    pytest.importorskip("transformers")
    from transformers import DynamicCache

    from veloxquant.integrations.transformers import (ATTENTION_NAME, VeloxQuantCache,
                                                      VeloxQuantCudaLayer)
    model = _tiny_llama(64).to("cuda")
    tokens = torch.randint(0, 512, (2, 56), generator=torch.Generator().manual_seed(2)).cuda()

    def run(cache, attention):
        model.set_attn_implementation(attention)
        try:
            with torch.no_grad():
                logits = [model(tokens[:, :16], past_key_values=cache, use_cache=True).logits,
                          model(tokens[:, 16:32], past_key_values=cache, use_cache=True).logits]
                for i in range(32, tokens.shape[1]):
                    logits.append(model(tokens[:, i:i + 1], past_key_values=cache, use_cache=True).logits)
        finally:
            model.set_attn_implementation("sdpa")
        return torch.cat(logits, dim=1).float().cpu()

    reference = run(DynamicCache(config=model.config), "sdpa")
    config = KVCacheConfig(method="turboquant_rvq", bits=4, num_residuals=3, value_bits=16)
    cache = VeloxQuantCache.from_model(model, config, max_seq_len=256)
    logits = run(cache, ATTENTION_NAME)
    assert all(isinstance(layer, VeloxQuantCudaLayer) and layer.batch_size == 2
               for layer in cache.layers)
    assert all(c.size == tokens.shape[1] for layer in cache.layers for c in layer.rows)
    err = ((logits - reference).abs().max() / reference.abs().max()).item()
    assert err < 0.05, err
    assert ((logits[:, :16] - reference[:, :16]).abs().max() / reference.abs().max()).item() < 1e-4


@needs_cuda
@pytest.mark.parametrize("config", [
    KVCacheConfig(method="qjl", bits=1, value_bits=4, sketch_dim=128, seed=3),
    KVCacheConfig(method="turboquant_rvq", bits=2, value_bits=4, use_hadamard=False, seed=4),
], ids=lambda c: c.method)
def test_transformers_codec_gpu_layers_follow_the_cpu_layers(config):
    """Outside the TurboQuant kernels' scope, every layer runs on a CudaKVCache. Token by token
    (every step a decode step, on the codes) each GPU layer's attention follows a CPU cache fed
    the same keys, values and queries: the same codes (dequantized within 1e-5) and attention
    within 1e-3. (Two whole models cannot be compared logit by logit: the GPU's tensor cores sum
    in fp16 tiles, ~2e-4 off the CPU per layer, and a later layer's 1-bit codes flip on such
    differences, 0.05 in the logits of this qjl model; session o.) A prefill chunk on the GPU
    runs SDPA on exact keys, which the CPU layers do not, so chunks are covered by
    test_gpu_layer_logic_on_exact_tokens instead."""
    pytest.importorskip("transformers")
    from veloxquant.integrations.transformers import (ATTENTION_NAME, VeloxQuantCache,
                                                      VeloxQuantCudaKVLayer)
    model = _tiny_llama(64).to("cuda")
    tokens = torch.randint(0, 512, (1, 60), generator=torch.Generator().manual_seed(3)).cuda()

    class Recorder:
        """A layer's device cache that also keeps what it is given and what it answers."""

        def __init__(self, inner, log):
            self.inner, self.log = inner, log

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def append(self, keys, values):
            self.log.append(("append", keys.cpu().numpy(), values.cpu().numpy()))
            self.inner.append(keys, values)

        def attend(self, queries, **kwargs):
            out = self.inner.attend(queries, **kwargs)
            self.log.append(("attend", queries.cpu().numpy(), kwargs["scale"], out.cpu().numpy()))
            return out

    gpu = VeloxQuantCache.from_model(model, config, max_seq_len=256)
    assert all(isinstance(layer, VeloxQuantCudaKVLayer) for layer in gpu.layers)
    assert gpu.devices == ["cuda:0", "cuda:0"]
    logs = [[] for _ in gpu.layers]
    for layer, log in zip(gpu.layers, logs):
        layer.rows = [Recorder(layer.rows[0], log)]
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        with torch.no_grad():
            for i in range(tokens.shape[1]):
                logits = model(tokens[:, i:i + 1], past_key_values=gpu, use_cache=True).logits
                assert torch.isfinite(logits).all()
    finally:
        model.set_attn_implementation("sdpa")
    assert gpu.get_seq_length() == tokens.shape[1]
    cpu = VeloxQuantCache.from_model(model, config, max_seq_len=256, backend="cpu")
    assert cpu.devices == ["cpu", "cpu"]
    for index, (layer, log) in enumerate(zip(cpu.layers, logs)):
        reference, device = layer.rows[0], gpu.layers[index].rows[0].inner
        steps = 0
        for entry in log:
            if entry[0] == "append":
                reference.append(entry[1], entry[2])
                continue
            _, queries, scale, out = entry
            want = reference.attend(queries[:, None, :], scale=scale, causal=True)[:, 0, :]
            assert rel(out, want) < 1e-3, (index, steps, rel(out, want))
            steps += 1
        assert steps == tokens.shape[1] and reference.size == device.size
        for got, want in zip(device.dequantize(), reference.dequantize()):
            assert rel(got.cpu().numpy(), want) < 1e-5, index
    # fetch_dequantized on the device layers: SDPA over every token dequantized on the GPU.
    fetched = VeloxQuantCache.from_model(model, config, max_seq_len=256, fetch_dequantized=True)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        model(tokens[:, :24], past_key_values=fetched, use_cache=True)
    assert fetched.get_seq_length() == 24
    gpu.crop(-4)
    assert gpu.get_seq_length() == tokens.shape[1] - 4
    gpu.reset()
    assert gpu.get_seq_length() == 0


def test_transformers_cuda_backend_needs_cuda():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from veloxquant.integrations.transformers import VeloxQuantCache
    model = _tiny_llama(64, layers=1)  # on the CPU
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        VeloxQuantCache.from_model(model, KVCacheConfig(method="turboquant_rvq", bits=2),
                                   backend="cuda")
    cache = VeloxQuantCache.from_model(model, KVCacheConfig(method="turboquant_rvq", bits=2))
    assert cache.devices == ["cpu"]



@needs_cuda
def test_transformers_sliding_window_layers_stay_on_the_gpu():
    """A model whose config marks sliding-window layers (a tiny Qwen2, window 24, every other
    layer) keeps them on the GPU: a CudaKVCache with that window and no sinks, whose chunks and
    decode steps attend on the codes within the window. With fp16 codes its logits follow the
    model's own full-sequence forward (transformers' sliding mask) as the CPU window layers do,
    through a 40-token prompt in two chunks and 60 decode steps, while its device pages stay
    those of the window."""
    pytest.importorskip("transformers")
    from veloxquant.integrations.transformers import VeloxQuantCache, VeloxQuantCudaKVLayer
    model = tiny_sliding_qwen2().to("cuda")
    tokens = torch.randint(0, 512, (1, 100), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        reference = model(tokens, use_cache=False).logits[0].float().cpu()
    config = KVCacheConfig(method="fp16", value_bits=16)
    gpu = VeloxQuantCache.from_model(model, config, max_seq_len=256, backend="cuda")
    assert gpu.devices == ["cuda:0", "cuda:0"]
    window_layer = gpu.layers[0]
    assert isinstance(window_layer, VeloxQuantCudaKVLayer) and window_layer.is_sliding
    assert (window_layer.cache.window, window_layer.cache.sink_tokens) == (24, 0)
    assert not gpu.layers[1].is_sliding
    logits = _chunked_logits(model, gpu, "veloxquant", tokens, 16, 40)
    cpu = VeloxQuantCache.from_model(model, config, max_seq_len=256, backend="cpu")
    on_cpu = _chunked_logits(model, cpu, "veloxquant", tokens, 16, 40)
    scale = reference.abs().max()
    assert ((on_cpu - reference).abs().max() / scale).item() < 2e-3
    assert ((logits - reference).abs().max() / scale).item() < 2e-3
    assert gpu.get_seq_length() == 100
    held = [window_layer.cache.position_held(64 * p) for p in range(2)]
    assert held == [False, True]  # positions 0-63 lie before the last step's window (76-99)


@needs_cuda
def test_transformers_sliding_layers_take_the_tuned_cache():
    """A turboquant_rvq config puts the sliding-window layers of a tiny Qwen2 (window 24) on a
    CudaTurboQuantCache with that window and no sinks: its prefill chunks run SDPA over the
    window's earlier tokens (dequantized) and the chunk's exact ones, its decode steps run the
    tuned kernels within the window, and its device pages follow the window. Against the
    model's own full forward (transformers' sliding mask): a first chunk of 30 tokens (longer
    than the window) gives its logits exactly, and at 4-bit keys of three stages and fp16
    values the second chunk and 60 decode steps stay as near as the full-attention layers'
    (test_transformers_gpu_layers_follow_the_default_cache)."""
    pytest.importorskip("transformers")
    from veloxquant.integrations.transformers import VeloxQuantCache, VeloxQuantCudaLayer
    model = tiny_sliding_qwen2().to("cuda")
    tokens = torch.randint(0, 512, (1, 100), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        reference = model(tokens, use_cache=False).logits[0].float().cpu()
    config = KVCacheConfig(method="turboquant_rvq", bits=4, num_residuals=3, value_bits=16)
    gpu = VeloxQuantCache.from_model(model, config, max_seq_len=256, backend="cuda")
    window_layer = gpu.layers[0]
    assert isinstance(window_layer, VeloxQuantCudaLayer) and window_layer.is_sliding
    assert (window_layer.cache.window, window_layer.cache.sink_tokens) == (24, 0)
    assert isinstance(gpu.layers[1], VeloxQuantCudaLayer) and not gpu.layers[1].is_sliding
    logits = _chunked_logits(model, gpu, "veloxquant", tokens, 30, 40)
    scale = reference.abs().max()
    first = ((logits[:30] - reference[:30]).abs().max() / scale).item()
    error = ((logits - reference).abs().max() / scale).item()
    print(f"tuned sliding layer: logits' relative error {first:.2e} (first chunk), {error:.2e}")
    assert first < 1e-4, first
    assert error < 0.05, error
    assert gpu.get_seq_length() == 100
    held = [window_layer.cache.position_held(64 * p) for p in range(2)]
    assert held == [False, True]  # positions 0-63 lie before the last step's window (76-99)


@needs_cuda
def test_transformers_outlier_layers_stay_on_the_gpu():
    """An outlier observer keeps every layer on the GPU: a CudaKVCache whose side store holds the
    tokens the observer flags (at fp16 here), scored from there in its decode steps. Through a
    40-token chunk, a 10-token chunk and 40 decode steps its logits follow the model's own
    full forward as the CPU layers' do, and each layer flags the tokens the CPU layer flags."""
    pytest.importorskip("transformers")
    from veloxquant.integrations.transformers import VeloxQuantCache, VeloxQuantCudaKVLayer
    model = _tiny_llama(64).to("cuda")
    tokens = torch.randint(0, 512, (1, 90), generator=torch.Generator().manual_seed(6)).cuda()
    with torch.no_grad():
        reference = model(tokens, use_cache=False).logits[0].float().cpu()

    def config():  # an observer per model: its statistics follow one cache's tokens
        return KVCacheConfig(method="fp16", value_bits=16, outlier_bits=16,
                             outlier_observer=KeyNormObserver(z_threshold=1.5))

    gpu = VeloxQuantCache.from_model(model, config(), max_seq_len=256, backend="cuda")
    assert gpu.devices == ["cuda:0", "cuda:0"]
    assert all(isinstance(layer, VeloxQuantCudaKVLayer) for layer in gpu.layers)
    logits = _chunked_logits(model, gpu, "veloxquant", tokens, 40, 50)
    cpu = VeloxQuantCache.from_model(model, config(), max_seq_len=256, backend="cpu")
    on_cpu = _chunked_logits(model, cpu, "veloxquant", tokens, 40, 50)
    scale = reference.abs().max()
    assert ((on_cpu - reference).abs().max() / scale).item() < 2e-3
    assert ((logits - reference).abs().max() / scale).item() < 2e-3
    flagged = [layer.cache.outlier_tokens for layer in gpu.layers]
    assert flagged == [layer.cache.outlier_tokens for layer in cpu.layers]
    assert min(flagged) > 0


@needs_cuda
def test_transformers_outlier_layers_take_a_batch(monkeypatch):
    """Two sequences with an outlier observer: each decode step of the pair runs as one
    (CudaKVCacheBatch: one append and one attention launch, each sequence's side store read as
    its own), the observer seeing the sequences' norms in order, as the layers' steps one
    sequence at a time show them: the same flags in every cache and the same logits (1e-4) as
    those steps, and logits within 2e-3 of the CPU layers', whose first layer flags the same
    tokens. (Later layers' keys follow the earlier layers' attention, whose rounding differs
    between the backends: a norm at the threshold may fall either side on the CPU. fp16 codes,
    as the CPU layers' prefill attends on the codes where the GPU's runs SDPA on exact keys.)"""
    pytest.importorskip("transformers")
    from veloxquant.integrations.transformers import VeloxQuantCache, VeloxQuantCudaKVLayer
    model = _tiny_llama(64).to("cuda")
    tokens = torch.randint(0, 512, (2, 60), generator=torch.Generator().manual_seed(7)).cuda()

    def run(backend):
        config = KVCacheConfig(method="fp16", value_bits=16, outlier_bits=16,
                               outlier_observer=KeyNormObserver(z_threshold=1.5))
        cache = VeloxQuantCache.from_model(model, config, max_seq_len=256, backend=backend)
        model.set_attn_implementation("veloxquant")
        try:
            with torch.no_grad():
                logits = [model(tokens[:, :30], past_key_values=cache, use_cache=True).logits]
                for i in range(30, tokens.shape[1]):
                    logits.append(model(tokens[:, i:i + 1], past_key_values=cache,
                                        use_cache=True).logits)
        finally:
            model.set_attn_implementation("sdpa")
        flagged = [[c.outlier_tokens for c in layer.rows] for layer in cache.layers]
        return cache, torch.cat(logits, dim=1).float().cpu(), flagged

    gpu, logits, flagged = run("cuda")
    for layer in gpu.layers:
        assert isinstance(layer, VeloxQuantCudaKVLayer) and layer.batch_size == 2
        assert layer._batch is not None and layer._batch.alike(layer.rows)  # steps went as one
    assert min(min(row) for row in flagged) > 0
    with monkeypatch.context() as m:  # the same model, each sequence's step on its own
        m.setattr(VeloxQuantCudaKVLayer, "_batched_steps", lambda self: False)
        _, one_by_one, flagged_one_by_one = run("cuda")
    assert flagged == flagged_one_by_one
    assert ((logits - one_by_one).abs().max() / one_by_one.abs().max()).item() < 1e-4
    _, on_cpu, flagged_on_cpu = run("cpu")
    assert flagged[0] == flagged_on_cpu[0]
    assert ((logits - on_cpu).abs().max() / on_cpu.abs().max()).item() < 2e-3
