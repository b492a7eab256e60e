"""numpy (and torch) -> cache -> dequantize/attend equals the C++ API's results bit for bit:
against a run done entirely in C++ on copies of the inputs (_debug.reference_run), against a
saved and reloaded cache, and across input layouts and dtypes (float16, batched, strided,
torch through DLPack). No tolerances here."""

import warnings
from dataclasses import replace

import numpy as np
import pytest

import veloxquant
from veloxquant import _arrays
from veloxquant._core import _debug
from veloxquant.cache.base import KVCacheConfig, KVCacheFactory
from veloxquant.observers.key_norm import KeyNormObserver

H, D, HQ = 2, 64, 4
CHUNKS = [37, 50, 1, 12]  # crosses page boundaries (64 tokens per page) and mixes sizes
TOTAL = sum(CHUNKS)

CONFIGS = {
    "turboquant_rvq_b1": dict(method="turboquant_rvq", bits=1),
    "turboquant_rvq_b3_v4": dict(method="turboquant_rvq", bits=3, value_bits=4, num_residuals=3),
    "turboquant_rvq_haar": dict(method="turboquant_rvq", bits=2, use_hadamard=False),
    "qjl": dict(method="qjl", sketch_dim=96),
    "polarquant": dict(method="polarquant", bits=2, value_bits=3),
    "rabitq": dict(method="rabitq", bits=2, num_clusters=8),
    "ratequant": dict(method="ratequant", bits=2, bit_allocation={"0.1": 4}),
    "fp16": dict(method="fp16"),
    "unfused": dict(method="turboquant_rvq", bits=2, use_fused_sdpa=False),
    "values_fp16": dict(method="qjl", value_bits=16),
    "outliers": dict(method="turboquant_rvq", bits=2, outlier_bits=16),
    "centred": dict(method="turboquant_rvq", bits=2, center_keys=True,
                    rope_inv_freq=[10000.0 ** (-2 * i / D) for i in range(D // 2)]),
    "centred_rabitq": dict(method="rabitq", bits=2, num_clusters=8, center_keys=True),
    "centred_half_split": dict(method="turboquant_rvq", bits=2, center_keys=True,
                               rope_inv_freq=[10000.0 ** (-2 * i / D) for i in range(D // 4)],
                               rope_half_split=True),
}


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def make_config(name):
    fields = dict(CONFIGS[name])
    if name == "outliers":
        fields["outlier_observer"] = KeyNormObserver(min_count=16)  # a fresh one per cache
    return KVCacheConfig(**fields)


def inputs():
    keys, values = rand(H, TOTAL, D, seed=1), rand(H, TOTAL, D, seed=2)
    keys[:, ::17] *= 40.0  # a few large norms (outliers where an observer is set)
    return keys, values, rand(HQ, 5, D, seed=3)


def python_run(config, keys, values, queries, convert=lambda x: x):
    cache = KVCacheFactory.create(config, H, D, 512)
    start = 0
    for n in CHUNKS:
        cache.append(convert(keys[:, start:start + n]), convert(values[:, start:start + n]))
        start += n
    out = cache.attend(convert(queries), scale=0.125, causal=True)
    return cache, out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_python_api_equals_a_pure_cxx_run(name):
    keys, values, queries = inputs()
    cache, out = python_run(make_config(name), keys, values, queries)
    ref_keys, ref_values, ref_out = _debug.reference_run(
        make_config(name).to_core(), H, D, 512, 0, keys, values, CHUNKS, queries, 0.125, True)
    got_keys, got_values = cache.dequantize()
    assert np.array_equal(got_keys, ref_keys) and np.array_equal(got_values, ref_values)
    assert np.array_equal(out, ref_out)
    if name == "outliers":
        assert cache.outlier_tokens > 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_and_load_round_trip(name, tmp_path):
    keys, values, queries = inputs()
    cache, out = python_run(make_config(name), keys, values, queries)
    path = tmp_path / f"{name}.vq"
    cache.save(path)
    loaded = veloxquant.KVCache.load(path)
    assert type(loaded) is type(cache) and loaded.size == TOTAL
    # The outlier side store counts its vectors' capacity, which a reload trims to the size.
    assert loaded.nbytes == cache.nbytes if cache.outlier_tokens == 0 else loaded.nbytes <= cache.nbytes
    for a, b in zip(loaded.dequantize(), cache.dequantize()):
        assert np.array_equal(a, b)
    assert np.array_equal(loaded.attend(queries, scale=0.125, causal=True), out)
    cfg, loaded_cfg = cache.config, loaded.config
    for field in ("method", "bits", "value_bits", "num_residuals", "use_hadamard", "sketch_dim",
                  "num_clusters", "bit_allocation", "use_fused_sdpa", "seed", "outlier_bits"):
        assert getattr(loaded_cfg, field) == getattr(cfg, field)


def test_sliding_window_save_and_load(tmp_path):
    keys, values, queries = rand(H, 300, D), rand(H, 300, D, seed=1), rand(HQ, 1, D, seed=2)
    inner = KVCacheFactory.create(KVCacheConfig(method="turboquant_rvq", bits=2), H, D, 1000)
    window = veloxquant.SlidingWindowKVCache(inner, window=70, sink_tokens=4)
    for start in range(0, 300, 50):
        window.append(keys[:, start:start + 50], values[:, start:start + 50])
    window.save(tmp_path / "window.vq")
    loaded = veloxquant.KVCache.load(tmp_path / "window.vq")
    assert isinstance(loaded, veloxquant.SlidingWindowKVCache)
    assert (loaded.window, loaded.sink_tokens, loaded.size) == (70, 4, 300)
    assert np.array_equal(loaded.attend(queries), window.attend(queries))
    with pytest.raises(IndexError, match="evicted"):
        loaded.dequantize(64, 10)


def test_float16_batched_and_strided_inputs_equal_float32():
    keys, values, queries = inputs()
    config = KVCacheConfig(method="turboquant_rvq", bits=2)
    k16, v16, q16 = (x.astype(np.float16) for x in (keys, values, queries))
    ref, ref_out = python_run(config, *(x.astype(np.float32) for x in (k16, v16, q16)))
    half, half_out = python_run(config, k16, v16, q16)
    assert np.array_equal(half_out, ref_out)
    for a, b in zip(half.dequantize(), ref.dequantize()):
        assert np.array_equal(a, b)
    f32, f32_out = python_run(config, keys, values, queries)
    batched, batched_out = python_run(config, keys, values, queries, convert=lambda x: x[None])
    assert batched_out.shape == (1, HQ, 5, D) and np.array_equal(batched_out[0], f32_out)
    # Strided views (heads and tokens swapped in memory) convert to the same values.
    strided, strided_out = python_run(
        config, keys, values, queries, convert=lambda x: np.swapaxes(np.swapaxes(x, 0, 1).copy(), 0, 1))
    assert np.array_equal(strided_out, f32_out)
    assert np.array_equal(strided.dequantize()[0], f32.dequantize()[0])


def test_out_argument_and_zero_copy():
    keys, values, queries = inputs()
    cache, out = python_run(KVCacheConfig(method="qjl"), keys, values, queries)
    buffer = np.full((1, HQ, 5, D), 7.0, dtype=np.float32)
    returned = cache.attend(queries[None], scale=0.125, causal=True, out=buffer)
    assert returned is buffer and np.array_equal(buffer[0], out)
    assert _arrays.as_float32(keys, "keys") is keys  # float32 C-contiguous: no copy
    assert _arrays.as_float32(keys.astype(np.float16), "keys").dtype == np.float32


def test_update_and_fetch_returns_every_token():
    cache = KVCacheFactory.create(KVCacheConfig(method="fp16"), H, D)
    keys, values = rand(1, H, 10, D), rand(1, H, 10, D, seed=1)
    k, v = cache.update_and_fetch(keys, values)
    assert k.shape == (1, H, 10, D)
    np.testing.assert_array_equal(k, keys.astype(np.float16).astype(np.float32))
    k, v = cache.update_and_fetch(keys[0, :, :3], values[0, :, :3])
    assert k.shape == (H, 13, D)


def test_torch_tensors_cross_through_dlpack():
    torch = pytest.importorskip("torch")
    keys, values, queries = inputs()
    config = KVCacheConfig(method="turboquant_rvq", bits=2)
    ref, ref_out = python_run(config, keys, values, queries)
    tensor, tensor_out = python_run(config, keys, values, queries, convert=torch.from_numpy)
    assert isinstance(tensor_out, torch.Tensor) and tensor_out.dtype == torch.float32
    assert np.array_equal(tensor_out.numpy(), ref_out)
    bf16 = lambda x: torch.from_numpy(x).to(torch.bfloat16)  # noqa: E731
    as_f32 = lambda x: bf16(x).float().numpy()  # noqa: E731
    ref_bf, ref_bf_out = python_run(config, as_f32(keys), as_f32(values), as_f32(queries))
    got_bf, got_bf_out = python_run(config, keys, values, queries, convert=bf16)
    assert np.array_equal(got_bf_out.numpy(), ref_bf_out)
    out = torch.empty(HQ, 5, D)
    assert tensor.attend(torch.from_numpy(queries), scale=0.125, causal=True, out=out) is out
    assert np.array_equal(out.numpy(), ref_out)
    grad = torch.from_numpy(keys[:, :3]).requires_grad_(True)
    tensor.append(grad, grad)  # tensors that require grad are detached
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="run on the CPU"):
            tensor.append(grad.cuda(), grad.cuda())


def test_a_short_first_append_warns_that_centring_is_off():
    # A centred cache estimates its keys' mean from its first append; fewer than
    # CENTER_MIN_TOKENS tokens leave it uncentred for good, which the append says.
    assert veloxquant.CENTER_MIN_TOKENS == 16
    keys, values = rand(H, 40, D, seed=1), rand(H, 40, D, seed=2)
    short = KVCacheFactory.create(make_config("centred"), H, D, 512)
    with pytest.warns(RuntimeWarning, match="first append holds 8 tokens.*stay uncentred"):
        short.append(keys[:, :8], values[:, :8])
    quiet = [
        (make_config("centred"), [16, 1]),      # long enough; later appends never warn
        (make_config("centred"), [0, 20]),      # an empty append trains nothing
        (make_config("turboquant_rvq_b1"), [8]),  # not centred
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short.append(keys[:, 8:9], values[:, 8:9])  # its second append
        for config, chunks in quiet:
            cache = KVCacheFactory.create(config, H, D, 512)
            start = 0
            for n in chunks:
                cache.append(keys[:, start:start + n], values[:, start:start + n])
                start += n
    # The short cache attends as one whose mean is zero: an uncentred cache of the same codec
    # gives the same output on the same tokens.
    plain = KVCacheFactory.create(replace(make_config("centred"), center_keys=False), H, D, 512)
    plain.append(keys[:, :9], values[:, :9])
    queries = rand(HQ, 1, D, seed=3)
    assert np.array_equal(short.attend(queries), plain.attend(queries))
