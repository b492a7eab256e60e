"""Independent numpy reference of the rabitq key codec (methods/rabitq.h) against the C++
cache, written from the documented format: per token a cluster id (1 byte if num_clusters
<= 256, else 2), the levels u packed LSB-first and one float f; x_bar = u - (2^B - 1)/2,
x_hat = c + f x_bar, k_hat = R^T x_hat, score = <q', c> + f <x_bar, q'>.

The raw pages come through _debug.page_regions, the IVF centroids from the cache's saved
file (numpy_reference.read_rabitq_file parses the documented save format; no binding exposes
them), and the rotation R is rebuilt from the documented seeded generator. Checked: (a) the
numpy decode of the raw codes equals dequantize(); (b) re-encoding every key in numpy
(nearest centroid, then the best code by an exhaustive critical-point search, then f) gives
the stored ids, codes and f; (c) attention from the numpy estimator on the codes equals
attend(); (d) the estimator is unbiased over re-drawn seeds; and, where faiss is installed,
the 1-bit codes and estimates agree with faiss's RaBitQuantizer on the same rotated data."""

import functools
import math
import os
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest

import numpy_reference as ref
from veloxquant import TOKENS_PER_PAGE
from veloxquant._core import _debug
from veloxquant.cache.base import KVCacheConfig, QuantizedKVCache

H, HQ, N, LAYER, VALUE_BITS = 2, 4, 100, 1, 4
P = TOKENS_PER_PAGE


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def clustered_keys(h, n, d, seed):
    """Keys around 6 random centres per head, with norms spread over 0.5..2 times."""
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.standard_normal((h, 6, d))
    pick = rng.integers(0, 6, size=(h, n))
    keys = np.take_along_axis(centres, pick[:, :, None], axis=1) + rng.standard_normal((h, n, d))
    return (keys * np.linspace(0.5, 2.0, n)[None, :, None]).astype(np.float32)


def stored(cache, head, n):
    """Raw key codes [n, bytes], f [n], value codes and value scales of one head."""
    parts = [_debug.page_regions(cache._impl, p, head) for p in range((n + P - 1) // P)]
    join = lambda key, axis: np.concatenate([r[key] for r in parts], axis=axis)  # noqa: E731
    return (join("key_codes", 0)[:n], join("key_scalars", 1)[0, :n].astype(np.float64),
            join("value_codes", 0)[:n], join("value_scalars", 1)[0, :n])


def saved_state(cache):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cache.vq")
        cache.save(path)
        return ref.read_rabitq_file(path)


@functools.lru_cache(maxsize=None)
def build(d, bits, hadamard, num_clusters=8, chunks=(N,), seed=7):
    """A rabitq cache appended in `chunks`, with everything the numpy side needs per head."""
    n = sum(chunks)
    config = KVCacheConfig(method="rabitq", bits=bits, value_bits=VALUE_BITS,
                           num_clusters=num_clusters, use_hadamard=hadamard, seed=seed)
    cache = QuantizedKVCache(config, H, d, max_seq_len=512, layer=LAYER)
    keys = clustered_keys(H, n, d, seed=100 * d + bits)
    values = rand(H, n, d, seed=d + 1)
    start, states = 0, []
    for c in chunks:
        cache.append(keys[:, start:start + c], values[:, start:start + c])
        start += c
        states.append(saved_state(cache))
    state = states[-1]
    heads = []
    for h in range(H):
        kcodes, f, vcodes, vscales = stored(cache, h, n)
        rotation = ref.rotation_matrix(d, hadamard, ref.derive_seed(seed, LAYER, h, d, ref.KEY_ROTATION))
        vrot = ref.rotation_matrix(d, hadamard, ref.derive_seed(seed, LAYER, h, d, ref.VALUE_ROTATION))
        vcent, _ = _debug.scalar_codebook("rotated", d, VALUE_BITS)
        heads.append(SimpleNamespace(
            codes=kcodes, f=f, rotation=rotation,
            centroids=state["centroids"][h].astype(np.float64),
            values_hat=ref.value_decode(vcodes, vscales, vrot, vcent.astype(np.float64), VALUE_BITS)))
    return SimpleNamespace(cache=cache, keys=keys, values=values, heads=heads, states=states,
                           d=d, bits=bits, num_clusters=num_clusters, chunks=chunks, n=n)


# (d, bits, use_hadamard, num_clusters, chunks): d = 64 with the randomized Hadamard transform
# and d = 128 with the dense rotation at every width, plus the other rotation at one width
# each, and 2-byte cluster ids (num_clusters > 256) trained on a short first append.
CASES = ([(64, b, True, 8, (N,)) for b in (1, 2, 3, 4)]
         + [(128, b, False, 8, (N,)) for b in (1, 2, 3, 4)]
         + [(64, 3, False, 8, (N,)), (128, 2, True, 8, (N,)),
            (64, 2, True, 300, (30, 70)), (128, 4, False, 300, (20, 50, 30))])
IDS = [f"d{d}-b{b}-{'had' if h else 'dense'}-k{k}-{'+'.join(map(str, c))}" for d, b, h, k, c in CASES]


@pytest.mark.parametrize("half_split", [False, True])
def test_a_centred_cache_file_parses(half_split):
    config = KVCacheConfig(method="rabitq", bits=2, value_bits=VALUE_BITS, num_clusters=8,
                           center_keys=True, rope_half_split=half_split)
    cache = QuantizedKVCache(config, H, 64, max_seq_len=512, layer=LAYER)
    cache.append(clustered_keys(H, 40, 64, seed=3), rand(H, 40, 64, seed=4))
    state = saved_state(cache)
    assert state["crc_ok"] and state["center_keys"] and state["size"] == 40
    assert state["rope_half_split"] == half_split
    assert [c.shape for c in state["centroids"]] == [(8, 64)] * H


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_layout_and_centroids(case):
    s = build(*case)
    d, bits, k = s.d, s.bits, s.num_clusters
    state = s.states[-1]
    assert state["crc_ok"] and state["method"] == "rabitq" and state["size"] == s.n
    assert not state["center_keys"]
    assert (state["bits"], state["num_clusters"], state["head_dim"]) == (bits, k, d)
    # Centroids are learned once, on the first append: min(num_clusters, first chunk) of them,
    # unchanged by later appends.
    for later in s.states[1:]:
        for a, b in zip(s.states[0]["centroids"], later["centroids"]):
            np.testing.assert_array_equal(a, b)
    for hd in s.heads:
        assert hd.centroids.shape == (min(k, s.chunks[0]), d)
        assert hd.codes.shape[1] == ref.rabitq_id_bytes(k) + (d * bits + 7) // 8
        ids, _ = ref.rabitq_split(hd.codes, d, bits, k)
        assert ids.max() < len(hd.centroids)
        if k > 256:
            assert not np.any(hd.codes[:, 1])  # high byte of ids below 256


@pytest.mark.parametrize("d, hadamard", [(64, True), (128, False)])
def test_single_centroid_is_mean_of_rotated_first_append(d, hadamard):
    """k-means with k = 1 on the rotated keys: the mean of the training subsample (first append
    only, 32 points per centroid, evenly spaced: token i * n // m)."""
    s = build(d, 2, hadamard, 1, (N, 20))
    first = s.keys[:, :N].astype(np.float64)
    sub = [i * N // 32 for i in range(32)]
    for h, hd in enumerate(s.heads):
        expected = first[h, sub].mean(0) @ hd.rotation.T
        np.testing.assert_allclose(hd.centroids[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_decode_matches_dequantize(case):
    """(a) numpy decode of the raw codes == cache.dequantize()."""
    s = build(*case)
    got_keys, got_values = s.cache.dequantize()
    for h, hd in enumerate(s.heads):
        decoded = ref.rabitq_decode(hd.codes, hd.f, hd.centroids, hd.rotation, s.bits, s.num_clusters)
        scale = np.abs(decoded).max()
        np.testing.assert_allclose(got_keys[h], decoded, rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(got_values[h], hd.values_hat, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reencode_matches_stored_codes(case):
    """(b) numpy encode (nearest centroid, exhaustive critical-point code search, f) == the
    stored cluster ids, levels and f; a differing code must be a near-tie in cosine."""
    s = build(*case)
    d, bits = s.d, s.bits
    for h, hd in enumerate(s.heads):
        ids, levels, f, x = ref.rabitq_encode(s.keys[h].astype(np.float64), hd.rotation, hd.centroids, bits)
        got_ids, got_levels = ref.rabitq_split(hd.codes, d, bits, s.num_clusters)
        # Cluster ids: equal, or the two centroids are equally near (float32 distances).
        dist = ((x[:, None, :] - hd.centroids[None]) ** 2).sum(-1)
        rows = np.arange(s.n)
        gap = dist[rows, got_ids] - dist[rows, ids]
        assert np.all((got_ids == ids) | (gap <= 1e-5 * dist[rows, ids]))
        assert np.mean(got_ids == ids) >= 0.98
        e = x - hd.centroids[got_ids]
        # A key that is itself a centroid (a singleton cluster, or every training key when
        # num_clusters >= the first append) has e = 0 exactly in float32: f = 0 and the levels
        # of s = 0 with the sign of e_j >= 0, u = 2^(B-1); in float64 its residual is rounding.
        on_centroid = hd.f == 0
        assert np.all(np.linalg.norm(e[on_centroid], axis=1) <= 1e-5 * np.linalg.norm(x[on_centroid], axis=1))
        assert np.all(got_levels[on_centroid] == 1 << (bits - 1))
        live = ~on_centroid
        assert live.sum() >= 0.6 * s.n
        # Levels against the stored cluster's residual.
        same = np.all(got_levels == np.where((got_ids == ids)[:, None], levels, -1), axis=1)
        assert same[live].mean() >= 0.98, f"{same[live].mean():.3f} of codes match"
        best = np.stack([ref.rabitq_best_levels(r, bits) for r in e[live]])
        cos_best = ref.rabitq_cosine(best, e[live], bits)
        cos_got = ref.rabitq_cosine(got_levels[live], e[live], bits)
        # The stored code is optimal up to float rounding (a different code only on a near-tie).
        assert np.all(cos_got >= cos_best * (1 - 1e-6))
        # f = ||e||^2 / <x_bar, e> of the stored code.
        np.testing.assert_allclose(hd.f[live], ref.rabitq_factor(got_levels[live], e[live], bits), rtol=1e-5)
        both = live & same
        np.testing.assert_allclose(hd.f[both], f[both], rtol=1e-5)


@pytest.mark.parametrize("d, hadamard, bits_list", [(4, True, (1, 2, 3, 4)), (6, False, (1, 2, 3))])
def test_code_search_is_exhaustive(d, hadamard, bits_list):
    """At tiny d every one of the 2^(B d) codes is enumerated: the brute-force optimum of the
    cosine equals both the stored code and the numpy critical-point search."""
    for bits in bits_list:
        seed = 3
        config = KVCacheConfig(method="rabitq", bits=bits, num_clusters=3, use_hadamard=hadamard, seed=seed)
        cache = QuantizedKVCache(config, 1, d, max_seq_len=64, layer=0)
        keys = rand(1, 40, d, seed=bits)
        cache.append(keys, rand(1, 40, d, seed=9))
        codes, f, _, _ = stored(cache, 0, 40)
        centroids = saved_state(cache)["centroids"][0].astype(np.float64)
        rotation = ref.rotation_matrix(d, hadamard, ref.derive_seed(seed, 0, 0, d, ref.KEY_ROTATION))
        ids, levels = ref.rabitq_split(codes, d, bits, 3)
        e = keys[0].astype(np.float64) @ rotation.T - centroids[ids]
        for t in np.flatnonzero(f != 0):  # f = 0: the key is its own centroid, e = 0
            brute = ref.rabitq_brute_force_levels(e[t], bits)
            search = ref.rabitq_best_levels(e[t], bits)
            cb, cs, cg = (ref.rabitq_cosine(v, e[t], bits) for v in (brute, search, levels[t]))
            assert cs == pytest.approx(cb, rel=1e-12) and cg >= cb * (1 - 1e-6)
            if cg > cb * (1 - 1e-9) and not np.array_equal(brute, levels[t]):
                continue  # exact tie between distinct codes
            np.testing.assert_array_equal(levels[t], brute)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_attention_from_codes_matches_attend(case):
    """(c) attention with the numpy estimator <q', c> + f <x_bar, q'> on the raw codes ==
    attend(), to 1e-5 relative (of the output's scale)."""
    s = build(*case)
    d = s.d
    queries = rand(HQ, 3, d, seed=99) * 2
    scores = lambda h, q: ref.rabitq_scores(  # noqa: E731
        q, s.heads[h].codes, s.heads[h].f, s.heads[h].centroids, s.heads[h].rotation, s.bits, s.num_clusters)
    keys_hat = np.zeros((H, s.n, d))
    values_hat = np.stack([hd.values_hat for hd in s.heads])
    for causal in (True, False):
        expected = ref.attention(queries, keys_hat, values_hat, 1 / math.sqrt(d), causal, scores)
        got = s.cache.attend(queries, causal=causal)
        err = np.abs(got - expected).max() / np.abs(expected).max()
        assert err < 1e-5, f"max error {err:.2e} of the output scale"
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# (d): over re-drawn seeds (each (seed, head) a fresh rotation and k-means seed) the estimate
# of <q, k> for a fixed pair must average to <q, k>. Dense (Haar) rotation, as RaBitQ's
# unbiasedness argument assumes; one centroid, so that the residual e = k - mean(keys) of each
# pair is the same for every seed. Each (seed, head) unit takes one pair: key i = unit mod 32,
# query q = g + ||g|| e/||e|| (g Gaussian, fixed per unit), which leans on e so that the
# classic uncorrected estimate c + ||e|| o_bar (shrunk by <o_bar, o> < 1) would be biased.
UNBIASED_SEEDS, UNBIASED_HEADS, UNBIASED_KEYS = 256, 8, 32


@functools.lru_cache(maxsize=None)
def unbiasedness_errors(d, bits):
    keys = rand(UNBIASED_KEYS, d, seed=500 + d).astype(np.float64) * 1.5 + 0.5
    mean = keys.mean(0)
    units = UNBIASED_SEEDS * UNBIASED_HEADS
    rng = np.random.default_rng(1000 + 10 * d + bits)
    g = rng.standard_normal((units, d))
    which = np.arange(units) % UNBIASED_KEYS
    e = keys[which] - mean
    q = g + np.linalg.norm(g, axis=1, keepdims=True) * e / np.linalg.norm(e, axis=1, keepdims=True)
    truth = (q * keys[which]).sum(1)
    est, naive = np.zeros(units), np.zeros(units)
    kv = np.broadcast_to(keys.astype(np.float32), (UNBIASED_HEADS, UNBIASED_KEYS, d)).copy()
    for s in range(UNBIASED_SEEDS):
        config = KVCacheConfig(method="rabitq", bits=bits, value_bits=16, num_clusters=1,
                               use_hadamard=False, seed=10_000 + s)
        cache = QuantizedKVCache(config, UNBIASED_HEADS, d, max_seq_len=64, layer=0)
        cache.append(kv, kv)
        k_hat = cache.dequantize()[0].astype(np.float64)
        for h in range(UNBIASED_HEADS):
            u = s * UNBIASED_HEADS + h
            kh = k_hat[h, which[u]]
            est[u] = q[u] @ kh
            # c + ||e|| o_bar: k_hat - c = f R^T x_bar, so o_bar = (k_hat - c)/||k_hat - c||.
            r = kh - mean
            naive[u] = q[u] @ (mean + np.linalg.norm(e[u]) * r / np.linalg.norm(r))
    return est - truth, naive - truth


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_estimator_is_unbiased_over_seeds(d, bits):
    """(d) mean error within 3 standard errors over 2048 independent (seed, head) pairs; the
    uncorrected estimator on the same draws is rejected (the test has power)."""
    err, naive = unbiasedness_errors(d, bits)
    assert len(err) >= 2000
    se = err.std(ddof=1) / math.sqrt(len(err))
    assert abs(err.mean()) < 3 * se, f"mean error {err.mean():.3g}, standard error {se:.3g}"
    se_naive = naive.std(ddof=1) / math.sqrt(len(naive))
    assert naive.mean() < -5 * se_naive, f"naive mean {naive.mean():.3g}, se {se_naive:.3g}"


# Optional cross-check with faiss's RaBitQuantizer (1 bit). faiss runs on the same rotated
# keys x = R k with our stored centroid of each token. Where the definitions match: the sign
# bits (faiss: e_j > 0, ours e_j >= 0; equal unless e_j == 0), the reconstruction (faiss
# decodes c + (2 dp_multiplier / sqrt(d)) (bit - 1/2), ours c + f x_bar, so f = 2
# dp_multiplier / sqrt(d)) and the residual term of the estimate. The IP estimates differ by
# definition: faiss estimates <e, q' - c> and adds the exact <e, c> (from its stored
# ||e||^2 - ||x||^2), ours estimates <e, q'> directly, so
#     faiss(q') = ours(q') + <e, c> - f <x_bar, c>.
@pytest.mark.parametrize("case", [c for c in CASES if c[1] == 1], ids=[i for c, i in zip(CASES, IDS) if c[1] == 1])
def test_one_bit_matches_faiss_rabitq(case):
    faiss = pytest.importorskip("faiss")
    s = build(*case)
    d = s.d
    queries = rand(5, d, seed=42).astype(np.float64) * 2
    for h, hd in enumerate(s.heads):
        ids, levels = ref.rabitq_split(hd.codes, d, 1, s.num_clusters)
        x = (s.keys[h].astype(np.float64) @ hd.rotation.T).astype(np.float32)
        rq = faiss.RaBitQuantizer(d, faiss.METRIC_INNER_PRODUCT, 1)
        nbits = (d + 7) // 8
        assert rq.code_size == nbits + 8
        codes = np.zeros((s.n, rq.code_size), dtype=np.uint8)
        cents = hd.centroids.astype(np.float32)
        for t in range(s.n):
            rq.compute_codes_core(faiss.swig_ptr(x[t:t + 1]), faiss.swig_ptr(codes[t]), 1,
                                  faiss.swig_ptr(cents[ids[t]]))
        e = x.astype(np.float64) - hd.centroids[ids]
        # Keys that are their own centroid have e = 0 in the C++ float32 rotation (f = 0)
        # but rounding noise here: no comparable code.
        live = hd.f != 0
        signs = ref.unpack(codes[:, :nbits], d, 1)
        tiny = np.abs(e) <= 1e-6 * np.linalg.norm(x, axis=1, keepdims=True)
        assert np.all((signs == levels) | tiny | ~live[:, None])
        factors = codes[:, nbits:].copy().view(np.float32)  # or_minus_c_l2sqr, dp_multiplier
        np.testing.assert_allclose(2 * factors[live, 1] / math.sqrt(d), hd.f[live], rtol=1e-5)
        x_bar = ref.rabitq_grid(levels, 1)
        for t in np.flatnonzero(live):
            out = np.zeros(d, dtype=np.float32)
            rq.decode_core(faiss.swig_ptr(codes[t]), faiss.swig_ptr(out), 1, faiss.swig_ptr(cents[ids[t]]))
            np.testing.assert_allclose(out, hd.centroids[ids[t]] + hd.f[t] * x_bar[t], rtol=1e-5, atol=1e-5)
        for query in queries:
            qr = (hd.rotation @ query).astype(np.float32)
            ours = ref.rabitq_scores(query, hd.codes, hd.f, hd.centroids, hd.rotation, 1, s.num_clusters)
            correction = (e * hd.centroids[ids]).sum(1) - hd.f * (x_bar * hd.centroids[ids]).sum(1)
            theirs = np.zeros(s.n)
            for c in np.unique(ids):
                dc = rq.get_distance_computer(0, faiss.swig_ptr(cents[c]))
                dc.set_query(faiss.swig_ptr(qr))
                for t in np.flatnonzero(ids == c):
                    theirs[t] = dc.distance_to_code(faiss.swig_ptr(codes[t]))
            scale = np.abs(ours).max()
            np.testing.assert_allclose(theirs[live], (ours + correction)[live], rtol=1e-4, atol=1e-5 * scale)
