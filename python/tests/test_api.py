"""The seed's API, name for name: import paths, the KVCacheConfig dataclass (fields, types,
defaults, order), the factory and builder signatures, cache properties, the builder's model
descriptions, and errors arriving as Python exceptions that carry the C++ message."""

import dataclasses
import importlib
import inspect
from types import SimpleNamespace

import numpy as np
import pytest

import veloxquant
from veloxquant.cache.base import KVCacheBuilder, KVCacheConfig, KVCacheFactory
from veloxquant.observers.key_norm import KeyNormObserver

# The seed's dataclass (cache-api.txt), in its order: (name, annotation, default).
SEED_FIELDS = [
    ("method", "str", dataclasses.MISSING),
    ("bits", "int", 1),
    ("value_bits", "int", 2),
    ("num_residuals", "int", 2),
    ("use_hadamard", "bool", True),
    ("codebook", "ndarray | None", None),
    ("smooth_factors", "ndarray | None", None),
    ("rotations", "list | None", None),
    ("bit_allocation", "dict[str, int] | None", None),
    ("outlier_observer", "KeyNormObserver | None", None),
    ("outlier_bits", "int", 8),
    ("sketch_dim", "int", 64),
    ("num_clusters", "int", 64),
    ("num_subspaces", "int | None", None),
    ("use_fused_sdpa", "bool", True),
    ("signal_bits", "int", 4),
    ("noise_bits", "int", 1),
    ("seed", "int", 0),
]

# Seed module paths with veloxquant_mlx -> veloxquant, and the class each exports.
IMPORT_PATHS = [
    ("veloxquant.cache.base", "KVCacheConfig"),
    ("veloxquant.cache.base", "KVCacheFactory"),
    ("veloxquant.cache.base", "KVCacheBuilder"),
    ("veloxquant.cache.turboquant_rvq_cache", "TurboQuantRVQKVCache"),
    ("veloxquant.cache.vecinfer_cache", "VecInferKVCache"),
    ("veloxquant.cache.spectral_cache", "SpectralQuantKVCache"),
    ("veloxquant.cache.polar_cache", "PolarQuantKVCache"),
    ("veloxquant.cache.qjl_cache", "QJLKVCache"),
    ("veloxquant.cache.sliding_window_cache", "SlidingWindowKVCache"),
    ("veloxquant.cache.rabitq_cache", "RaBitQKVCache"),
    ("veloxquant.cache.commvq_cache", "CommVQKVCache"),
    ("veloxquant.cache.ratequant_cache", "RateQuantKVCache"),
    ("veloxquant.observers.key_norm", "KeyNormObserver"),
]

# method -> class name of the cache the factory makes.
SERVING = {
    "turboquant_rvq": "TurboQuantRVQKVCache",
    "qjl": "QJLKVCache",
    "polarquant": "PolarQuantKVCache",
    "rabitq": "RaBitQKVCache",
    "ratequant": "RateQuantKVCache",
    "fp16": "FP16KVCache",
}
NEEDS_CALIBRATION = {
    "vecinfer": "VecInferKVCache",
    "spectral": "SpectralQuantKVCache",
    "commvq": "CommVQKVCache",
}


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_config_dataclass_matches_seed():
    assert dataclasses.is_dataclass(KVCacheConfig)
    got = [(f.name, f.type, f.default) for f in dataclasses.fields(KVCacheConfig)]
    # The seed's fields in its order, then our extensions (filled from a calibration).
    assert got[: len(SEED_FIELDS)] == SEED_FIELDS
    assert got[len(SEED_FIELDS):] == [("ivf_centroids", "ndarray | None", None),
                                      ("rope_inv_freq", "list[float] | None", None),
                                      ("center_keys", "bool", False),
                                      ("rope_half_split", "bool", False)]
    assert KVCacheConfig(method="qjl").method == "qjl"
    with pytest.raises(TypeError):
        KVCacheConfig()  # method is required


@pytest.mark.parametrize("module, name", IMPORT_PATHS)
def test_import_paths(module, name):
    obj = getattr(importlib.import_module(module), name)
    assert inspect.isclass(obj)
    assert getattr(veloxquant, name) is obj


def test_factory_and_builder_signatures():
    create = inspect.getattr_static(KVCacheFactory, "create")
    build = inspect.getattr_static(KVCacheBuilder, "build")
    assert isinstance(create, staticmethod) and isinstance(build, staticmethod)
    params = inspect.signature(KVCacheFactory.create).parameters
    assert [(p.name, p.default) for p in params.values()] == [
        ("config", inspect.Parameter.empty), ("num_heads", inspect.Parameter.empty),
        ("head_dim", inspect.Parameter.empty), ("max_seq_len", 8192)]
    params = inspect.signature(KVCacheBuilder.build).parameters
    assert [(p.name, p.default) for p in params.values()] == [
        ("model", inspect.Parameter.empty), ("config", inspect.Parameter.empty),
        ("max_seq_len", 8192), ("calibration", None)]
    assert inspect.signature(KVCacheBuilder.build).return_annotation == "list[KVCache]"


@pytest.mark.parametrize("method", sorted(SERVING))
def test_factory_makes_each_method_class(method):
    cache = KVCacheFactory.create(KVCacheConfig(method=method), 2, 64)
    assert type(cache).__name__ == SERVING[method] == cache.class_name
    assert isinstance(cache, getattr(veloxquant, SERVING[method]))
    assert (cache.num_heads, cache.head_dim, cache.max_seq_len, cache.size) == (2, 64, 8192, 0)
    assert cache.config.method == method
    # A method's class constructs the same cache directly.
    direct = getattr(veloxquant, SERVING[method])(KVCacheConfig(method=method), 2, 64)
    assert direct.class_name == SERVING[method]
    generic = veloxquant.QuantizedKVCache(KVCacheConfig(method=method), 2, 64, layer=3)
    assert type(generic).__name__ == SERVING[method] and generic.layer == 3


@pytest.mark.parametrize("method", sorted(NEEDS_CALIBRATION))
def test_calibrated_methods_raise_the_core_error(method):
    with pytest.raises(ValueError, match=f"method '{method}' needs calibration"):
        KVCacheFactory.create(KVCacheConfig(method=method), 2, 64)
    cls = getattr(veloxquant, NEEDS_CALIBRATION[method])
    with pytest.raises(ValueError, match="needs calibration"):
        cls(KVCacheConfig(method=method), 2, 64)


def test_cache_properties_and_lifecycle():
    cache = KVCacheFactory.create(KVCacheConfig(method="turboquant_rvq", bits=2), 4, 64, 1000)
    empty = cache.nbytes
    cache.append(rand(4, 100, 64), rand(4, 100, 64, seed=1))
    assert cache.size == len(cache) == cache.offset == 100
    assert cache.nbytes == cache.storage_bytes + cache.parameter_bytes > empty
    # 2 stages x 2 bits + a float32 norm per 64 coordinates; values 2 bits + a float32 scale.
    assert cache.key_bits_per_coordinate == pytest.approx(4 + 32 / 64)
    assert cache.value_bits_per_coordinate == pytest.approx(2 + 32 / 64)
    assert cache.outlier_tokens == 0 and cache.layer == 0
    assert cache.is_trimmable() and cache.trim(30) == 30 and cache.size == 70
    cache.reset()
    assert cache.size == 0
    assert "TurboQuantRVQKVCache" in repr(cache)


def test_config_arrays_and_maps_cross_to_the_core():
    observer = KeyNormObserver(z_threshold=2.5, min_count=16)
    config = KVCacheConfig(
        method="ratequant", bits=3, codebook=np.arange(12, dtype=np.float16).reshape(3, 4),
        smooth_factors=[1.0, 2.0], rotations=[np.eye(4)], bit_allocation={"0": 2, "0.1": 4},
        outlier_observer=observer, num_subspaces=8, seed=2**63 + 5)
    back = KVCacheConfig.from_core(config.to_core())
    assert back.codebook.dtype == np.float32 and back.codebook.shape == (3, 4)
    np.testing.assert_array_equal(back.codebook, np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(back.smooth_factors, [1.0, 2.0])
    np.testing.assert_array_equal(back.rotations[0], np.eye(4))
    assert back.bit_allocation == {"0": 2, "0.1": 4}
    assert back.outlier_observer is observer
    assert (back.num_subspaces, back.seed, back.bits) == (8, 2**63 + 5, 3)
    cache = KVCacheFactory.create(config, 2, 32)
    assert cache.config.outlier_observer is observer


def test_ratequant_bits_follow_the_layer_allocation():
    config = KVCacheConfig(method="ratequant", bits=2, bit_allocation={"1": 4, "2.1": 1})
    caches = KVCacheBuilder.build([(2, 64)] * 3, config, max_seq_len=128)
    bits = [c.key_bits_per_coordinate - 0.5 for c in caches]
    assert bits == pytest.approx([2, 4, (2 + 1) / 2])
    assert [c.layer for c in caches] == [0, 1, 2]


def test_builder_reads_model_descriptions():
    config = KVCacheConfig(method="qjl")
    hf_config = SimpleNamespace(num_hidden_layers=3, num_attention_heads=8, hidden_size=512,
                                num_key_value_heads=2)
    hf_model = SimpleNamespace(config=hf_config)
    caches = KVCacheBuilder.build(hf_model, config, max_seq_len=256)
    assert [(c.num_heads, c.head_dim, c.max_seq_len) for c in caches] == [(2, 64, 256)] * 3
    # head_dim given explicitly; KV heads defaulting to the attention heads; per-layer lists.
    explicit = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                               head_dim=32, num_key_value_heads=None)
    assert [(c.num_heads, c.head_dim) for c in KVCacheBuilder.build(explicit, config)] == \
        [(4, 32)] * 2
    per_layer = SimpleNamespace(num_hidden_layers=2, num_attention_heads=[4, 8],
                                num_key_value_heads=[1, 2], hidden_size=256)
    assert [(c.num_heads, c.head_dim) for c in KVCacheBuilder.build(per_layer, config)] == \
        [(1, 64), (2, 32)]
    # Multimodal configs: the text config is used.
    wrapper = SimpleNamespace(get_text_config=lambda decoder=False: hf_config)
    assert len(KVCacheBuilder.build(SimpleNamespace(config=wrapper), config)) == 3
    # mlx_lm models (args), our runtime's shape objects, and plain lists.
    assert len(KVCacheBuilder.build(SimpleNamespace(args=hf_config), config)) == 3

    class Runtime:
        def cache_shape(self):
            return [(2, 64), (4, 128)]

    assert [(c.num_heads, c.head_dim) for c in KVCacheBuilder.build(Runtime(), config)] == \
        [(2, 64), (4, 128)]
    layers = SimpleNamespace(layers=[SimpleNamespace(num_kv_heads=3, head_dim=16)])
    assert KVCacheBuilder.build(layers, config)[0].num_heads == 3
    with pytest.raises(ValueError, match="lists 3 values for 2 layers"):
        KVCacheBuilder.build(SimpleNamespace(num_hidden_layers=2, num_attention_heads=4,
                                             hidden_size=64, num_key_value_heads=[1, 1, 1]),
                             config)
    with pytest.raises(TypeError, match="cannot read the layer shapes"):
        KVCacheBuilder.build(object(), config)
    with pytest.raises(ValueError, match="no layers"):
        KVCacheBuilder.build([], config)


def test_config_errors_carry_the_core_message():
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of: turboquant_rvq"):
        KVCacheFactory.create(KVCacheConfig(method="nope"), 2, 64)
    with pytest.raises(ValueError, match=r"KVCacheConfig.bits must be in 1..8, got 9"):
        KVCacheConfig(method="turboquant_rvq", bits=9).validate()
    with pytest.raises(ValueError, match=r"value_bits must be in 1..8 or 16"):
        KVCacheFactory.create(KVCacheConfig(method="qjl", value_bits=12), 2, 64)
    with pytest.raises(ValueError, match="qjl stores one sign bit per sketch row"):
        KVCacheFactory.create(KVCacheConfig(method="qjl", bits=2), 2, 64)
    with pytest.raises(ValueError, match="bit_allocation key 'x' must be"):
        KVCacheConfig(method="ratequant", bit_allocation={"x": 2}).validate()
    with pytest.raises(ValueError, match="head_dim must be in 2..1024"):
        KVCacheFactory.create(KVCacheConfig(method="fp16"), 2, 1)
    with pytest.raises(ValueError, match="KVCacheConfig.bits must be an integer"):
        KVCacheConfig(method="qjl", bits="1").validate()
    with pytest.raises(ValueError, match="TurboQuantRVQKVCache needs method='turboquant_rvq'"):
        veloxquant.TurboQuantRVQKVCache(KVCacheConfig(method="qjl"), 2, 64)


def test_data_errors_carry_the_core_message(tmp_path):
    cache = KVCacheFactory.create(KVCacheConfig(method="turboquant_rvq"), 2, 32, max_seq_len=100)
    cache.append(rand(2, 60, 32), rand(2, 60, 32))
    with pytest.raises(veloxquant.CapacityError, match="would exceed max_seq_len 100"):
        cache.append(rand(2, 41, 32), rand(2, 41, 32))
    assert issubclass(veloxquant.CapacityError, ValueError) and cache.size == 60
    bad = rand(2, 3, 32)
    bad[1, 2, 5] = np.nan
    with pytest.raises(ValueError, match=r"append: keys contain NaN or Inf \(head 1, token 2\)"):
        cache.append(bad, rand(2, 3, 32))
    # fp16 storage cannot hold |x| >= 65520 (it would store inf): refused, nothing stored
    fp16 = KVCacheFactory.create(KVCacheConfig(method="fp16"), 2, 32, max_seq_len=100)
    big = rand(2, 3, 32)
    big[0, 1, 4] = 7e4
    with pytest.raises(ValueError, match=r"append: values exceed fp16's range, \|x\| < 65520 \(head 0, token 1\)"):
        fp16.append(rand(2, 3, 32), big)
    assert fp16.size == 0
    with pytest.raises(IndexError, match=r"dequantize: range \[50, 70\) is outside \[0, 60\)"):
        cache.dequantize(50, 20)
    with pytest.raises(ValueError, match="trim: cannot drop 61 of 60 tokens"):
        cache.trim(61)
    with pytest.raises(ValueError, match="causal with 61 queries needs at least"):
        cache.attend(rand(2, 61, 32), causal=True)
    with pytest.raises(ValueError, match=r"keys must have shape \[num_heads=2, n_tokens, head_dim=32\]"):
        cache.append(rand(3, 4, 32), rand(3, 4, 32))
    with pytest.raises(ValueError, match="batch size 2"):
        cache.append(rand(2, 2, 4, 32), rand(2, 2, 4, 32))
    with pytest.raises(ValueError, match="keys hold 4 tokens but values hold 5"):
        cache.append(rand(2, 4, 32), rand(2, 5, 32))
    with pytest.raises(ValueError, match="multiple of the 2 KV heads"):
        cache.attend(rand(3, 1, 32))
    with pytest.raises(ValueError, match="out must be a writable C-contiguous float32"):
        cache.attend(rand(2, 1, 32), out=np.zeros((2, 1, 32)))
    assert cache.size == 60  # nothing above changed the cache
    garbage = tmp_path / "garbage.vq"
    garbage.write_bytes(b"not a cache at all")
    with pytest.raises(RuntimeError, match="is not a VeloxQuant cache file"):
        veloxquant.KVCache.load(garbage)
    good = tmp_path / "good.vq"
    cache.save(good)
    truncated = tmp_path / "truncated.vq"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(RuntimeError, match="truncated cache file"):
        veloxquant.KVCache.load(truncated)
    with pytest.raises(RuntimeError):
        veloxquant.KVCache.load(tmp_path / "missing.vq")


def test_sliding_window_takes_over_its_inner_cache():
    config = KVCacheConfig(method="polarquant", bits=2)
    inner = KVCacheFactory.create(config, 2, 64, max_seq_len=1000)
    with pytest.raises(ValueError, match="window must be >= 1"):
        veloxquant.SlidingWindowKVCache(inner, 0)
    inner.append(rand(2, 5, 64), rand(2, 5, 64))  # still usable after a rejected wrap
    window = veloxquant.SlidingWindowKVCache(inner, window=64, sink_tokens=4)
    assert (window.window, window.sink_tokens, window.size) == (64, 4, 5)
    assert window.class_name == "SlidingWindowKVCache"
    with pytest.raises(ValueError, match="moved into a SlidingWindowKVCache"):
        inner.append(rand(2, 1, 64), rand(2, 1, 64))
    with pytest.raises(ValueError, match="wraps a quantized cache"):
        veloxquant.SlidingWindowKVCache(window, 8)


def test_key_norm_observer_routes_extreme_norms():
    observer = KeyNormObserver(z_threshold=3.0, min_count=32)
    assert (observer.z_threshold, observer.min_count) == (3.0, 32)
    cache = KVCacheFactory.create(
        KVCacheConfig(method="turboquant_rvq", outlier_observer=observer), 2, 64)
    keys = rand(2, 200, 64)
    keys[0, 150] *= 1000.0  # a norm far out in the upper tail
    cache.append(keys, rand(2, 200, 64))
    assert cache.outlier_tokens >= 1
    stats = observer.stats(0, 0)
    assert stats.count == 200 and stats.max_norm > 1000 and stats.heterogeneity_ratio > 100
    assert observer.is_outlier(0, 0, float(np.linalg.norm(keys[0, 150])))
    with pytest.raises(ValueError, match="z_threshold must be a positive number"):
        KeyNormObserver(z_threshold=-1.0)
    with pytest.raises(ValueError, match="outlier_observer must be a veloxquant KeyNormObserver"):
        KVCacheConfig(method="qjl", outlier_observer=object()).validate()
