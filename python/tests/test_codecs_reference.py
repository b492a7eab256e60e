"""Independent numpy references of the codecs (tests/numpy_reference.py: TurboQuant RVQ,
QJL, PolarQuant and the value codec) against the C++ caches on random inputs: the raw packed
storage of each page (read through _debug.page_regions) is decoded in numpy and must equal
dequantize(); the keys and values are re-encoded in numpy and must give the stored codes;
attention recomputed in numpy from the codes (with each codec's own score estimator) must
equal attend(). The rotations and sketches are rebuilt from the documented seeded generators,
not read from the library."""

import math

import numpy as np
import pytest

import numpy_reference as ref
from veloxquant import TOKENS_PER_PAGE, SlidingWindowKVCache
from veloxquant._core import _debug
from veloxquant.cache.base import KVCacheConfig, QuantizedKVCache

H, HQ, N, LAYER = 2, 4, 100, 1  # 100 tokens: one full page and a partial one
P = TOKENS_PER_PAGE

# MSE of the single-stage TurboQuant quantizer on unit vectors (arXiv 2504.19874, Table 1).
PAPER_MSE = {1: 0.363, 2: 0.117, 3: 0.0345, 4: 0.0095}


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def make_cache(d, **fields):
    cache = QuantizedKVCache(KVCacheConfig(**fields), H, d, max_seq_len=512, layer=LAYER)
    keys = rand(H, N, d, seed=d) * np.linspace(0.5, 3.0, N, dtype=np.float32)[None, :, None]
    values = rand(H, N, d, seed=d + 1)
    cache.append(keys, values)
    return cache, keys, values


def stored(cache, head):
    """Every token's raw regions of one head, pages concatenated: key codes [N, bytes], key
    scalars [k, N], value codes [N, bytes], value scalars [v, N]."""
    parts = [_debug.page_regions(cache._impl, p, head) for p in range((N + P - 1) // P)]
    join = lambda key, axis: np.concatenate([r[key] for r in parts], axis=axis)  # noqa: E731
    return (join("key_codes", 0)[:N], join("key_scalars", 1)[:, :N],
            join("value_codes", 0)[:N], join("value_scalars", 1)[:, :N])


def value_reference(cache, head, d, bits, use_hadamard, seed):
    """Decoded values of one head, checked against the numpy encoder on the way."""
    _, _, vcodes, vscalars = stored(cache, head)
    if bits == 16:
        return ref.value_decode(vcodes, None, np.eye(d), None, 16)
    rotation = ref.rotation_matrix(
        d, use_hadamard, ref.derive_seed(seed, LAYER, head, d, ref.VALUE_ROTATION))
    centroids, boundaries = _debug.scalar_codebook("rotated", d, bits)
    return ref.value_decode(vcodes, vscalars[0], rotation, centroids.astype(np.float64), bits)


def check_attention(cache, keys_hat, values_hat, d, scores=None):
    queries = rand(HQ, 3, d, seed=99)
    expected = ref.attention(queries, keys_hat, values_hat, 1 / math.sqrt(d), True, scores)
    got = cache.attend(queries, causal=True)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_rotated_coordinate_codebooks_fit_their_law(d, bits):
    centroids, boundaries = (c.astype(np.float64) for c in _debug.scalar_codebook("rotated", d, bits))
    assert len(centroids) == 2**bits and np.all(np.diff(centroids) > 0)
    np.testing.assert_allclose(boundaries, (centroids[1:] + centroids[:-1]) / 2, rtol=1e-6)
    x = np.linspace(-1, 1, 400001)
    w = ref.rotated_coordinate_pdf(d, x)
    w /= w.sum()
    cell = ref.quantize(x, boundaries)
    # Lloyd-Max optimality: every centroid is the conditional mean of its cell.
    means = np.bincount(cell, w * x, len(centroids)) / np.bincount(cell, w, len(centroids))
    np.testing.assert_allclose(centroids, means, atol=2e-4 / math.sqrt(d))
    if d == 128:
        mse = d * np.sum(w * (x - centroids[cell]) ** 2)  # per unit vector
        assert mse == pytest.approx(PAPER_MSE[bits], rel=0.05)


@pytest.mark.parametrize("d, bits, residuals, hadamard", [
    (64, 1, 2, True), (128, 3, 2, True), (64, 4, 3, True), (96, 2, 1, False), (80, 2, 2, True),
])
def test_turboquant_rvq_matches_numpy(d, bits, residuals, hadamard):
    seed = 7
    cache, keys, values = make_cache(d, method="turboquant_rvq", bits=bits, value_bits=3,
                                     num_residuals=residuals, use_hadamard=hadamard, seed=seed)
    books = [_debug.scalar_codebook("rotated", d, bits)] + [
        _debug.scalar_codebook("residual", d, bits, s) for s in range(1, residuals)]
    centroids = [c.astype(np.float64) for c, _ in books]
    boundaries = [b.astype(np.float64) for _, b in books]
    got_keys, got_values = cache.dequantize()
    keys_hat, values_hat = [], []
    for h in range(H):
        kcodes, kscalars, _, _ = stored(cache, h)
        # d = 80 is no power of two: the dense rotation replaces the Hadamard transform.
        rotation = ref.rotation_matrix(d, hadamard, ref.derive_seed(seed, LAYER, h, d, ref.KEY_ROTATION))
        decoded = ref.turboquant_decode(kcodes, kscalars[0], rotation, centroids, bits)
        np.testing.assert_allclose(got_keys[h], decoded, rtol=1e-4, atol=1e-5)
        indices, norms = ref.turboquant_encode(keys[h].astype(np.float64), rotation, centroids, boundaries)
        stage_bytes = (d * bits + 7) // 8
        stored_indices = np.stack([ref.unpack(kcodes[:, s * stage_bytes:(s + 1) * stage_bytes], d, bits)
                                   for s in range(residuals)], axis=1)
        assert np.mean(stored_indices == indices) > 0.999
        np.testing.assert_allclose(kscalars[0], norms, rtol=1e-6)
        keys_hat.append(decoded)
        values_hat.append(value_reference(cache, h, d, 3, hadamard, seed))
    np.testing.assert_allclose(got_values, np.stack(values_hat), rtol=1e-4, atol=1e-5)
    check_attention(cache, np.stack(keys_hat), np.stack(values_hat), d)


@pytest.mark.parametrize("d, m", [(64, 64), (80, 100), (128, 256)])
def test_qjl_matches_numpy(d, m):
    seed = 3
    cache, keys, _ = make_cache(d, method="qjl", sketch_dim=m, value_bits=2, seed=seed)
    got_keys, _ = cache.dequantize()
    sketches, codes, norms, values_hat = [], [], [], []
    for h in range(H):
        kcodes, kscalars, _, _ = stored(cache, h)
        assert kcodes.shape[1] == (m + 7) // 8
        sketch = ref.gaussian_sketch(m, d, ref.derive_seed(seed, LAYER, h, d, ref.SKETCH))
        np.testing.assert_allclose(
            got_keys[h], ref.qjl_decode(kcodes, kscalars[0], sketch.astype(np.float64)),
            rtol=1e-4, atol=1e-5)
        projected = keys[h].astype(np.float64) @ sketch.T.astype(np.float64)
        assert np.mean(ref.qjl_signs(kcodes, m) == np.where(projected >= 0, 1.0, -1.0)) > 0.999
        np.testing.assert_allclose(kscalars[0], np.linalg.norm(keys[h], axis=1), rtol=1e-6)
        if m % 8:  # bits past m in the last byte are zero
            assert not np.any(kcodes[:, -1] >> (m % 8))
        sketches.append(sketch.astype(np.float64))
        codes.append(kcodes)
        norms.append(kscalars[0])
        values_hat.append(value_reference(cache, h, d, 2, True, seed))
    # Scores from the paper's estimator on the codes, not from reconstructed keys.
    estimator = lambda h, q: ref.qjl_scores(q, codes[h], norms[h], sketches[h])  # noqa: E731
    check_attention(cache, got_keys, np.stack(values_hat), d, scores=estimator)


@pytest.mark.parametrize("d, bits, hadamard", [(64, 2, True), (128, 1, True), (96, 3, False)])
def test_polarquant_matches_numpy(d, bits, hadamard):
    seed = 5
    cache, keys, _ = make_cache(d, method="polarquant", bits=bits, value_bits=4,
                                use_hadamard=hadamard, seed=seed)
    books = [_debug.scalar_codebook("polar", d, bits + 2 if level == 1 else bits, level)
             for level in (1, 2, 3, 4)]
    centroids = [c.astype(np.float64) for c, _ in books]
    boundaries = [b.astype(np.float64) for _, b in books]
    got_keys, _ = cache.dequantize()
    values_hat = []
    l1, upper = ref.polar_layout(d, bits)
    for h in range(H):
        kcodes, kscalars, _, _ = stored(cache, h)
        assert kcodes.shape[1] == l1 + upper + 2 * (d // 16)
        rotation = ref.rotation_matrix(d, hadamard, ref.derive_seed(seed, LAYER, h, d, ref.KEY_ROTATION))
        decoded = ref.polar_decode(kcodes, kscalars[0], rotation, centroids, bits)
        np.testing.assert_allclose(got_keys[h], decoded, rtol=1e-4, atol=1e-5)
        indices, radii = ref.polar_encode(keys[h].astype(np.float64), rotation, boundaries)
        stored_levels = [ref.unpack(kcodes[:, :l1], d // 2, bits + 2),
                         ref.unpack(kcodes[:, l1:l1 + upper], d // 4 + d // 8 + d // 16, bits)]
        assert np.mean(stored_levels[0] == indices[0]) > 0.999
        assert np.mean(stored_levels[1] == np.concatenate(indices[1:], axis=1)) > 0.999
        stored_radii = kcodes[:, l1 + upper:].copy().view(np.float16).astype(np.float64)
        np.testing.assert_allclose(stored_radii, radii, rtol=1e-3, atol=1e-4)
        values_hat.append(value_reference(cache, h, d, 4, hadamard, seed))
    check_attention(cache, got_keys, np.stack(values_hat), d)


@pytest.mark.parametrize("d, hadamard", [(64, True), (80, False)])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_value_codec_matches_numpy(d, bits, hadamard):
    seed = 11
    cache, _, values = make_cache(d, method="turboquant_rvq", bits=2, value_bits=bits,
                                  use_hadamard=hadamard, seed=seed)
    _, got_values = cache.dequantize()
    for h in range(H):
        decoded = value_reference(cache, h, d, bits, hadamard, seed)
        np.testing.assert_allclose(got_values[h], decoded, rtol=1e-4, atol=1e-5)
        _, _, vcodes, vscalars = stored(cache, h)
        if bits == 16:
            np.testing.assert_array_equal(vcodes.view(np.float16), values[h].astype(np.float16))
            continue
        rotation = ref.rotation_matrix(
            d, hadamard, ref.derive_seed(seed, LAYER, h, d, ref.VALUE_ROTATION))
        centroids, boundaries = (c.astype(np.float64) for c in _debug.scalar_codebook("rotated", d, bits))
        indices, scales = ref.value_encode(values[h].astype(np.float64), rotation, centroids, boundaries)
        same = np.all(ref.unpack(vcodes, d, bits) == indices, axis=1)
        assert same.mean() > 0.9
        np.testing.assert_allclose(vscalars[0][same], scales[same], rtol=1e-5)


def test_sliding_window_attends_to_sinks_and_window():
    d, window, sinks = 64, 70, 4
    config = KVCacheConfig(method="turboquant_rvq", bits=2)
    keys, values = rand(H, 300, d), rand(H, 300, d, seed=1)
    full = QuantizedKVCache(config, H, d, 1000)
    full.append(keys, values)
    windowed = SlidingWindowKVCache(QuantizedKVCache(config, H, d, 1000), window, sinks)
    for start in range(0, 300, 20):  # pages are evicted as the window moves past them
        windowed.append(keys[:, start:start + 20], values[:, start:start + 20])
    keys_hat, values_hat = full.dequantize()
    visible = np.r_[0:sinks, 300 - window:300]
    query = rand(HQ, 1, d, seed=5)
    expected = ref.attention(query, keys_hat[:, visible], values_hat[:, visible], 1 / math.sqrt(d), False)
    np.testing.assert_allclose(windowed.attend(query), expected, rtol=1e-4, atol=1e-5)
    assert windowed.nbytes < full.nbytes
