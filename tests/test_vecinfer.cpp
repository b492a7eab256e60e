// vecinfer (VecInfer, arXiv 2510.06175): the codec against a naive double-precision reference
// (brute-force nearest codeword, bit-by-bit unpacking, explicit rotation matrix), fused against
// unfused attention in a cache, save/load, packed layout, every config error, and calibration:
// trained codebooks beat scaled random ones on held-out synthetic keys and, when the model file
// is present, on SmolLM2 keys (calibrated on WikiText-2 valid, evaluated on WikiText-2 test).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "calibration/vecinfer_calibration.h"
#include "core/rng.h"
#include "methods/vecinfer.h"
#include "model/llama_model.h"
#include "model/tokenizer.h"
#include "test_helpers.h"
#include "veloxquant/caches.h"
#include "veloxquant/factory.h"

namespace veloxquant {
namespace {

// Packed layout: S indices of log2(C) bits, LSB-first, rounded up to whole bytes.
static_assert(vecinfer_code_bytes(8, 8) == 8, "1 bit/coord at d=64: 8 one-byte indices");
static_assert(vecinfer_code_bytes(16, 8) == 16, "2 bits/coord at d=64");
static_assert(vecinfer_code_bytes(32, 6) == 24, "3 bits/coord at d=64 (sub_dim 2, C 64)");
static_assert(vecinfer_code_bytes(16, 12) == 24, "12-bit indices (the MLX default geometry)");
static_assert(vecinfer_code_bytes(3, 5) == 2, "15 bits round up to 2 bytes");
static_assert(vecinfer_code_bytes(128, 1) == 16, "1-bit indices");

// ---- independent reference -------------------------------------------------------------

// Dense matrix of a rotation, column j = R e_j, in double.
std::vector<double> matrix_of(const Rotation& r) {
    const int d = r.dim();
    std::vector<double> m(static_cast<std::size_t>(d) * d);
    std::vector<float> e(d), y(d);
    for (int j = 0; j < d; ++j) {
        std::fill(e.begin(), e.end(), 0.0f);
        e[j] = 1.0f;
        r.forward(e.data(), y.data());
        for (int i = 0; i < d; ++i) m[static_cast<std::size_t>(i) * d + j] = y[i];
    }
    return m;
}

// Index s of a code, read one bit at a time.
uint32_t naive_index(const uint8_t* code, int s, int bits) {
    uint32_t v = 0;
    for (int b = 0; b < bits; ++b) {
        const int bit = s * bits + b;
        v |= static_cast<uint32_t>((code[bit / 8] >> (bit % 8)) & 1) << b;
    }
    return v;
}

struct Reference {
    int d, S, C, sub;
    std::vector<float> codebook, smooth;
    std::vector<double> R;  // [d][d]

    std::vector<double> transform(const float* k) const {  // R (k / lambda)
        std::vector<double> x(d, 0.0);
        for (int i = 0; i < d; ++i)
            for (int j = 0; j < d; ++j)
                x[i] += R[static_cast<std::size_t>(i) * d + j] *
                        (k[j] / static_cast<double>(smooth[j]));
        return x;
    }
    double dist2(const std::vector<double>& x, int s, int c) const {
        double acc = 0.0;
        for (int j = 0; j < sub; ++j) {
            const double t =
                x[s * sub + j] - codebook[(static_cast<std::size_t>(s) * C + c) * sub + j];
            acc += t * t;
        }
        return acc;
    }
    std::vector<double> decode(const std::vector<uint32_t>& idx) const {  // lambda * R^T c
        std::vector<double> k(d, 0.0);
        for (int j = 0; j < d; ++j) {
            for (int i = 0; i < d; ++i) {
                const double c =
                    codebook[(static_cast<std::size_t>(i / sub) * C + idx[i / sub]) * sub +
                             i % sub];
                k[j] += R[static_cast<std::size_t>(i) * d + j] * c;
            }
            k[j] *= smooth[j];
        }
        return k;
    }
};

struct Geometry {
    int d, S, C;
};

class VecInferCodecTest : public ::testing::TestWithParam<Geometry> {};

TEST_P(VecInferCodecTest, MatchesNaiveReference) {
    const Geometry g = GetParam();
    Rng rng(derive_seed(11, g.d, g.S, g.C, RandomPurpose::kTest));
    Reference ref{g.d, g.S, g.C, g.d / g.S, {}, {}, {}};
    ref.codebook = vqtest::gaussian(rng, static_cast<std::size_t>(g.d) * g.C, 0.6);
    ref.smooth.resize(g.d);
    for (auto& s : ref.smooth) s = static_cast<float>(0.3 + 2.0 * rng.uniform());
    const Rotation rot = vecinfer_rotation(g.d, 2, 1);
    ref.R = matrix_of(rot);
    VecInferCodec codec(g.d, g.S, g.C, ref.codebook.data(), ref.smooth.data(), rot);
    const int bits = codec.code_bits();
    ASSERT_EQ(1 << bits, g.C);
    ASSERT_EQ(codec.code_bytes(), vecinfer_code_bytes(g.S, bits));
    EXPECT_EQ(codec.num_scalars(), 0);
    EXPECT_DOUBLE_EQ(codec.bits_per_coordinate(), static_cast<double>(bits) / ref.sub);

    const int n = 40;
    std::vector<float> keys = vqtest::gaussian(rng, static_cast<std::size_t>(n) * g.d);
    for (int t = 0; t < n; ++t)
        for (int j = 0; j < g.d; ++j) keys[t * g.d + j] *= ref.smooth[j];  // span the codebook
    // Padding bytes past the last index must be written as zeros: start from garbage.
    std::vector<uint8_t> codes(codec.code_bytes() * n, 0xA5);
    codec.encode(keys.data(), n, codes.data(), nullptr, n);
    std::vector<float> decoded(keys.size());
    codec.decode(codes.data(), nullptr, n, n, decoded.data());
    const std::vector<float> q = vqtest::gaussian(rng, g.d);
    std::vector<float> state(codec.query_state_size()), scores(n);
    codec.prepare_query(q.data(), state.data());
    codec.score(state.data(), codes.data(), nullptr, n, n, scores.data());

    for (int t = 0; t < n; ++t) {
        const uint8_t* code = &codes[t * codec.code_bytes()];
        const std::vector<double> x = ref.transform(&keys[t * g.d]);
        std::vector<uint32_t> idx(g.S);
        for (int s = 0; s < g.S; ++s) {
            idx[s] = naive_index(code, s, bits);
            ASSERT_LT(idx[s], static_cast<uint32_t>(g.C));
            EXPECT_EQ(codec.index(code, s), idx[s]);
            double best = INFINITY;
            int best_c = 0;
            for (int c = 0; c < g.C; ++c) {
                const double dd = ref.dist2(x, s, c);
                if (dd < best) best = dd, best_c = c;
            }
            // Same codeword, or (float rounding on a near tie) one exactly as near.
            if (static_cast<int>(idx[s]) != best_c) {
                EXPECT_NEAR(ref.dist2(x, s, idx[s]), best, 1e-5 * (1.0 + best))
                    << "token " << t << " sub " << s;
            }
        }
        const int used = g.S * bits;
        for (int bit = used; bit < static_cast<int>(codec.code_bytes()) * 8; ++bit)
            EXPECT_EQ((code[bit / 8] >> (bit % 8)) & 1, 0) << "padding bit " << bit;
        const std::vector<double> k_hat = ref.decode(idx);
        double dot = 0.0;
        for (int j = 0; j < g.d; ++j) {
            EXPECT_NEAR(decoded[t * g.d + j], k_hat[j], 1e-4 * (1.0 + std::fabs(k_hat[j])));
            dot += q[j] * k_hat[j];
        }
        EXPECT_NEAR(scores[t], dot, 1e-4 * (1.0 + std::fabs(dot))) << "token " << t;
    }
}

INSTANTIATE_TEST_SUITE_P(Geometries, VecInferCodecTest,
                         ::testing::Values(Geometry{64, 8, 256},    // 1 bit, byte indices
                                           Geometry{64, 16, 256},   // 2 bits
                                           Geometry{64, 32, 64},    // 3 bits, 6-bit indices
                                           Geometry{64, 16, 4096},  // 12-bit indices
                                           Geometry{96, 24, 16},    // dense rotation (d not 2^k)
                                           Geometry{128, 128, 2},   // 1-bit indices
                                           Geometry{80, 16, 32}),   // 5-bit indices, d = 80
                         [](const ::testing::TestParamInfo<Geometry>& info) {
                             const Geometry& g = info.param;
                             return "d" + std::to_string(g.d) + "_S" + std::to_string(g.S) + "_C" +
                                    std::to_string(g.C);
                         });

// ---- caches ------------------------------------------------------------------------------

// Keys with a few large channels and a per-channel scale spread (like real post-RoPE keys).
std::vector<float> anisotropic_keys(Rng& rng, int n, int d, int heads = 1) {
    std::vector<float> k = vqtest::gaussian(rng, static_cast<std::size_t>(heads) * n * d);
    for (int h = 0; h < heads; ++h)
        for (int t = 0; t < n; ++t)
            for (int j = 0; j < d; ++j) {
                const double scale = (j % 16 == 3 ? 12.0 : 1.0) * (0.3 + 1.7 * j / d);
                float& x = k[(static_cast<std::size_t>(h) * n + t) * d + j];
                x = static_cast<float>(x * scale + (j % 16 == 3 ? 8.0 : 0.0));
            }
    return k;
}

Activations activations_of(const std::vector<float>& keys, int layers, int heads, int n, int d) {
    Activations a;
    for (int l = 0; l < layers; ++l) {
        LayerActivations la;
        for (int h = 0; h < heads; ++h) {
            HeadSamples s;
            s.dim = d;
            const float* src = &keys[(static_cast<std::size_t>(l) * heads + h) * n * d];
            s.data.assign(src, src + static_cast<std::size_t>(n) * d);
            la.keys.push_back(std::move(s));
        }
        a.layers.push_back(std::move(la));
    }
    return a;
}

KVCacheConfig calibrated_config(int layers, int heads, int d, int bits, uint64_t seed) {
    Rng rng(seed);
    const int n = 600;
    const std::vector<float> keys = anisotropic_keys(rng, n, d, layers * heads);
    const VecInferCalibration cal =
        calibrate_vecinfer(activations_of(keys, layers, heads, n, d), bits, seed);
    KVCacheConfig c;
    c.method = "vecinfer";
    c.bits = bits;
    c.value_bits = 4;
    c.codebook = cal.codebook;
    c.smooth_factors = cal.smooth_factors;
    c.num_subspaces = cal.num_subspaces;
    return c;
}

TEST(VecInferCache, FusedMatchesUnfusedAndDequantizedReference) {
    const int H = 2, d = 64, n = 150, QH = 6, nq = 3;
    KVCacheConfig c = calibrated_config(2, H, d, 2, 5);
    Rng rng(77);
    const std::vector<float> keys = anisotropic_keys(rng, n, d, H);
    const std::vector<float> values = vqtest::gaussian(rng, keys.size());
    const std::vector<float> q = vqtest::gaussian(rng, static_cast<std::size_t>(QH) * nq * d, 0.2);
    c.use_fused_sdpa = true;
    VecInferKVCache fused(c, H, d, 512, 1);
    c.use_fused_sdpa = false;
    VecInferKVCache unfused(c, H, d, 512, 1);
    EXPECT_EQ(fused.class_name(), "VecInferKVCache");
    // Second chunk: tokens 100..149 of each head.
    std::vector<float> k2(static_cast<std::size_t>(H) * 50 * d), v2(k2.size());
    for (int h = 0; h < H; ++h)
        for (int t = 0; t < 50; ++t)
            for (int j = 0; j < d; ++j) {
                k2[(h * 50 + t) * d + j] =
                    keys[(static_cast<std::size_t>(h) * n + 100 + t) * d + j];
                v2[(h * 50 + t) * d + j] =
                    values[(static_cast<std::size_t>(h) * n + 100 + t) * d + j];
            }
    std::vector<float> k1(static_cast<std::size_t>(H) * 100 * d), v1(k1.size());
    for (int h = 0; h < H; ++h)
        for (int t = 0; t < 100; ++t)
            for (int j = 0; j < d; ++j) {
                k1[(h * 100 + t) * d + j] = keys[(static_cast<std::size_t>(h) * n + t) * d + j];
                v1[(h * 100 + t) * d + j] = values[(static_cast<std::size_t>(h) * n + t) * d + j];
            }
    for (KVCache* cache : {static_cast<KVCache*>(&fused), static_cast<KVCache*>(&unfused)}) {
        cache->append(k1.data(), v1.data(), 100);
        cache->append(k2.data(), v2.data(), 50);
        ASSERT_EQ(cache->size(), n);
    }
    std::vector<float> dk(keys.size()), dv(keys.size());
    fused.dequantize(0, n, dk.data(), dv.data());
    EXPECT_LT(vqtest::rel_error(dk, keys), 0.5);  // a real reconstruction, not noise
    for (bool causal : {false, true}) {
        std::vector<float> a(q.size()), b(q.size());
        fused.attend(q.data(), QH, nq, a.data(), 0.125f, causal);
        unfused.attend(q.data(), QH, nq, b.data(), 0.125f, causal);
        const std::vector<float> ref =
            vqtest::reference_attention(q, QH, nq, dk, dv, H, n, d, 0.125f, causal);
        EXPECT_LT(vqtest::rel_error(a, ref), 1e-4) << "causal " << causal;
        EXPECT_LT(vqtest::rel_error(b, ref), 1e-4) << "causal " << causal;
    }
    // Key bits: 16 one-byte indices per token at d = 64, no scalars.
    EXPECT_DOUBLE_EQ(fused.key_bits_per_coordinate(), 2.0);
}

TEST(VecInferCache, SaveLoadRoundTrip) {
    const int H = 3, d = 64, n = 70;
    KVCacheConfig c = calibrated_config(1, H, d, 1, 9);
    Rng rng(8);
    const std::vector<float> keys = anisotropic_keys(rng, n, d, H);
    const std::vector<float> values = vqtest::gaussian(rng, keys.size());
    auto cache = KVCacheFactory::create(c, H, d, 256);
    EXPECT_EQ(cache->class_name(), "VecInferKVCache");
    cache->append(keys.data(), values.data(), n);
    const std::string path = vqtest::unique_temp_path("vecinfer_cache.vqkv");
    cache->save(path);
    auto loaded = KVCache::load(path);
    std::remove(path.c_str());
    EXPECT_EQ(loaded->class_name(), "VecInferKVCache");
    ASSERT_EQ(loaded->size(), n);
    std::vector<float> k1(keys.size()), v1(keys.size()), k2(keys.size()), v2(keys.size());
    cache->dequantize(0, n, k1.data(), v1.data());
    loaded->dequantize(0, n, k2.data(), v2.data());
    EXPECT_EQ(k1, k2);
    EXPECT_EQ(v1, v2);
    const std::vector<float> q = vqtest::gaussian(rng, static_cast<std::size_t>(H) * d);
    std::vector<float> a(q.size()), b(q.size());
    cache->attend(q.data(), H, 1, a.data(), 0.125f, false);
    loaded->attend(q.data(), H, 1, b.data(), 0.125f, false);
    EXPECT_EQ(a, b);
    EXPECT_EQ(cache->nbytes(), loaded->nbytes());
}

TEST(VecInferCache, SharedCodebookAndSmoothingAndAnySeed) {
    // [S][C][sub_dim] and [d] are shared by every layer and head; the rotation does not depend
    // on config.seed, so the same calibration serves caches of any seed.
    const int d = 64;
    KVCacheConfig c = calibrated_config(1, 1, d, 2, 3);
    c.codebook.shape = {16, 256, 4};
    c.smooth_factors.shape = {d};
    Rng rng(4);
    const std::vector<float> keys = anisotropic_keys(rng, 50, d, 2);
    std::vector<float> out0(keys.size()), out1(keys.size()), v(keys.size());
    for (uint64_t seed : {0u, 12345u}) {
        c.seed = seed;
        auto cache = KVCacheFactory::create(c, 2, d, 64, 7);
        cache->append(keys.data(), keys.data(), 50);
        cache->dequantize(0, 50, seed == 0 ? out0.data() : out1.data(), v.data());
    }
    EXPECT_EQ(out0, out1);
    EXPECT_LT(vqtest::rel_error(out0, keys), 0.5);
}

void expect_error(const KVCacheConfig& c, int d, const std::vector<std::string>& parts,
                  int layer = 0, int heads = 1) {
    try {
        KVCacheFactory::create(c, heads, d, 64, layer);
        ADD_FAILURE() << "no error; expected one naming " << parts[0];
    } catch (const std::invalid_argument& e) {
        for (const auto& p : parts)
            EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
    }
}

TEST(VecInferCache, ConfigErrorsNameTheField) {
    const int d = 64;
    const KVCacheConfig good = calibrated_config(2, 2, d, 2, 1);  // [2][2][16][256][4], [2][2][64]
    ASSERT_NO_THROW(KVCacheFactory::create(good, 2, d, 64, 1));
    KVCacheConfig c = good;
    c.codebook = {};
    expect_error(
        c, d,
        {"KVCacheConfig.codebook", "calibrate_vecinfer", "veloxquant calibrate --method vecinfer"});
    c = good;
    c.smooth_factors = {};
    expect_error(c, d, {"KVCacheConfig.smooth_factors", "calibrate_vecinfer"});
    c = good;
    c.codebook.shape = {2, 2, 16, 1024};
    expect_error(c, d, {"KVCacheConfig.codebook", "shape"});
    c = good;
    c.codebook.shape = {2, 2, 16, 256, 5};
    expect_error(c, d, {"KVCacheConfig.codebook", "holds"});
    c = good;
    c.codebook.shape = {2, 2, 8, 256, 8};  // right size, but 8 x 8 = 64 != head_dim 32
    expect_error(c, 32, {"KVCacheConfig.codebook", "head_dim 32"});
    c = good;
    c.codebook.shape = {2, 2, 16, 128, 8};  // 128 codewords of sub_dim 8: 16 x 8 != 64
    expect_error(c, d, {"KVCacheConfig.codebook", "head_dim"});
    c = good;
    c.codebook.shape = {4, 2, 16, 128, 4};  // 128 codewords: 7 bits / 4 != bits 2
    expect_error(c, d, {"KVCacheConfig.bits", "rate"});
    c = good;
    c.codebook.shape = {4, 2, 32, 128, 2};  // 128 codewords of sub_dim 2: bits 3.5
    c.num_subspaces.reset();
    c.bits = 3;
    expect_error(c, d, {"KVCacheConfig.bits"});
    c = good;
    c.codebook.shape = {1, 1, 16, 16384, 4};  // too many codewords
    c.codebook.data.resize(16 * 16384 * 4);
    expect_error(c, d, {"KVCacheConfig.codebook", "codewords"});
    c = good;
    c.codebook.shape = {2, 4, 16, 192, 4};  // not a power of two
    c.codebook.data.resize(2 * 4 * 16 * 192 * 4);
    expect_error(c, d, {"KVCacheConfig.codebook", "power of two"});
    c = good;
    c.num_subspaces = 8;
    expect_error(c, d, {"KVCacheConfig.num_subspaces", "16"});
    c = good;
    c.bits = 1;
    expect_error(c, d, {"KVCacheConfig.bits"});
    c = good;
    expect_error(c, d, {"KVCacheConfig.codebook", "layer 2"}, 2);
    expect_error(c, d, {"KVCacheConfig.codebook", "head 2"}, 0, 3);
    c = good;
    c.smooth_factors.shape = {2, 4, 32};
    expect_error(c, d, {"KVCacheConfig.smooth_factors", "32 channels"});
    c = good;
    c.smooth_factors.shape = {4, 64};
    expect_error(c, d, {"KVCacheConfig.smooth_factors", "shape"});
    c = good;
    c.smooth_factors.shape = {1, 2, 64};
    c.smooth_factors.data.resize(128);
    expect_error(c, d, {"KVCacheConfig.smooth_factors", "layer 1"}, 1);
    c = good;
    c.smooth_factors.data[5] = 0.0f;
    expect_error(c, d, {"smooth_factors", "> 0"});
    c = good;
    c.smooth_factors.data[3] = NAN;
    expect_error(c, d, {"smooth_factors"});
    c = good;
    c.codebook.data[17] = INFINITY;
    expect_error(c, d, {"codebook", "not finite"});
    c = good;
    c.codebook.shape = {2, 2, 16, 0, 4};
    expect_error(c, d, {"KVCacheConfig.codebook", "non-positive"});
}

// ---- calibration ---------------------------------------------------------------------------

struct Errors {
    double mse = 0.0;    ///< ||k - k_hat||^2 / ||k||^2 over all tokens
    double score = 0.0;  ///< sum (q.(k - k_hat))^2 / sum (q.k)^2, Gaussian queries
    double proxy = 0.0;  ///< the same with other held-out keys as queries (real q ~ k channels)
};

// Errors of config c on held-out keys [layers][heads][n][d], through each head's codec.
Errors held_out_errors(const KVCacheConfig& c, const std::vector<float>& keys, int layers,
                       int heads, int n, int d) {
    Rng rng(999);
    double e2 = 0, k2 = 0, s_err = 0, s_ref = 0, p_err = 0, p_ref = 0;
    for (int l = 0; l < layers; ++l)
        for (int h = 0; h < heads; ++h) {
            const auto codec = make_key_codec(c, d, l, h);
            const float* k = &keys[(static_cast<std::size_t>(l) * heads + h) * n * d];
            std::vector<uint8_t> codes(codec->code_bytes() * n);
            std::vector<float> dec(static_cast<std::size_t>(n) * d);
            codec->encode(k, n, codes.data(), nullptr, n);
            codec->decode(codes.data(), nullptr, n, n, dec.data());
            for (int t = 0; t < n; ++t) {
                const float* kt = k + static_cast<std::size_t>(t) * d;
                const float* dt = &dec[static_cast<std::size_t>(t) * d];
                const std::vector<float> q = vqtest::gaussian(rng, d);
                const float* pq = k + static_cast<std::size_t>((t * 7 + 3) % n) * d;
                double es = 0, rs = 0, ep = 0, rp = 0;
                for (int j = 0; j < d; ++j) {
                    const double err = static_cast<double>(kt[j]) - dt[j];
                    e2 += err * err;
                    k2 += static_cast<double>(kt[j]) * kt[j];
                    es += q[j] * err;
                    rs += q[j] * static_cast<double>(kt[j]);
                    ep += pq[j] * err;
                    rp += pq[j] * static_cast<double>(kt[j]);
                }
                s_err += es * es, s_ref += rs * rs, p_err += ep * ep, p_ref += rp * rp;
            }
        }
    return {e2 / k2, s_err / s_ref, p_err / p_ref};
}

// The calibrated config with its codebooks replaced by sigma * N(0, 1) draws, sigma the RMS of
// the smoothed, rotated training coordinates of each head: a random codebook at the data's scale.
KVCacheConfig random_codebook_config(KVCacheConfig c, const Activations& train, uint64_t seed) {
    const int L = static_cast<int>(c.codebook.shape[0]), H = static_cast<int>(c.codebook.shape[1]);
    const int d = static_cast<int>(c.smooth_factors.shape[2]);
    const std::size_t block = c.codebook.data.size() / (static_cast<std::size_t>(L) * H);
    Rng rng(seed);
    for (int l = 0; l < L; ++l)
        for (int h = 0; h < H; ++h) {
            const HeadSamples& s = train.layers[l].keys[h];
            const float* lambda = &c.smooth_factors.data[(static_cast<std::size_t>(l) * H + h) * d];
            double sum2 = 0.0;  // the rotation is orthogonal: sum of squares is rotation-free
            for (int64_t i = 0; i < s.count(); ++i)
                for (int j = 0; j < d; ++j) sum2 += std::pow(s.row(i)[j] / lambda[j], 2);
            const double sigma = std::sqrt(sum2 / (static_cast<double>(s.count()) * d));
            const std::vector<float> r = vqtest::gaussian(rng, block, sigma);
            std::copy(r.begin(), r.end(),
                      c.codebook.data.begin() + (static_cast<std::size_t>(l) * H + h) * block);
        }
    return c;
}

KVCacheConfig config_from(const VecInferCalibration& cal, int bits) {
    KVCacheConfig c;
    c.method = "vecinfer";
    c.bits = bits;
    c.codebook = cal.codebook;
    c.smooth_factors = cal.smooth_factors;
    c.num_subspaces = cal.num_subspaces;
    return c;
}

TEST(VecInferCalibration, BeatsRandomCodebooksOnSyntheticAnisotropicKeys) {
    const int L = 2, H = 2, d = 64, n_train = 2000, n_test = 500;
    Rng rng(21);
    const std::vector<float> train_keys = anisotropic_keys(rng, n_train, d, L * H);
    const std::vector<float> test_keys = anisotropic_keys(rng, n_test, d, L * H);
    const Activations train = activations_of(train_keys, L, H, n_train, d);
    double previous = INFINITY;
    for (int bits = 1; bits <= 4; ++bits) {
        const VecInferCalibration cal = calibrate_vecinfer(train, bits, 42);
        const VecInferGeometry g = vecinfer_geometry(bits);
        ASSERT_EQ(cal.codebook.shape,
                  (std::vector<int64_t>{L, H, d / g.sub_dim, g.codewords, g.sub_dim}));
        ASSERT_EQ(cal.smooth_factors.shape, (std::vector<int64_t>{L, H, d}));
        EXPECT_EQ(cal.num_subspaces, d / g.sub_dim);
        const KVCacheConfig c = config_from(cal, bits);
        const Errors trained = held_out_errors(c, test_keys, L, H, n_test, d);
        const Errors random =
            held_out_errors(random_codebook_config(c, train, 5 + bits), test_keys, L, H, n_test, d);
        std::printf(
            "[synthetic] bits %d: MSE trained %.4f random %.4f | score err trained %.4f random "
            "%.4f\n",
            bits, trained.mse, random.mse, trained.score, random.score);
        EXPECT_LT(trained.mse, 0.8 * random.mse) << "bits " << bits;
        EXPECT_LT(trained.score, 0.8 * random.score) << "bits " << bits;
        EXPECT_LT(trained.mse, previous) << "more bits, less error";
        previous = trained.mse;
    }
}

TEST(VecInferCalibration, DeterministicSmoothingAndErrors) {
    const int d = 32, n = 300;
    Rng rng(2);
    const std::vector<float> keys = anisotropic_keys(rng, n, d, 2);
    const Activations acts = activations_of(keys, 1, 2, n, d);
    const VecInferCalibration a = calibrate_vecinfer(acts, 2, 1),
                              b = calibrate_vecinfer(acts, 2, 1);
    const VecInferCalibration other = calibrate_vecinfer(acts, 2, 2);
    EXPECT_EQ(a.codebook.data, b.codebook.data);
    EXPECT_NE(a.codebook.data, other.codebook.data);
    EXPECT_EQ(a.smooth_factors.data, other.smooth_factors.data);  // data-only, no randomness
    // The paper's lambda_i = sqrt(max_t |K_ti|), computed independently for head 1.
    for (int j = 0; j < d; ++j) {
        double m = 0.0;
        for (int t = 0; t < n; ++t)
            m = std::max(m, std::fabs(static_cast<double>(keys[(n + t) * d + j])));
        EXPECT_NEAR(a.smooth_factors.data[d + j], std::sqrt(m), 1e-5 * std::sqrt(m));
    }
    // Query balancing: lambda_i = sqrt(max|K_i| / max|Q_i|).
    HeadSamples q;
    q.dim = d;
    q.data.assign(static_cast<std::size_t>(4) * d, 0.5f);
    q.data[3] = -4.0f;  // channel 3 max |q| = 4
    const std::vector<float> lk =
        vecinfer_smooth_factors(acts.layers[0].keys[0], nullptr, VecInferSmoothing::kKeyAbsMax);
    const std::vector<float> lq =
        vecinfer_smooth_factors(acts.layers[0].keys[0], &q, VecInferSmoothing::kQueryBalanced);
    EXPECT_NEAR(lq[3], lk[3] / 2.0f, 1e-5);
    EXPECT_NEAR(lq[0], lk[0] / std::sqrt(0.5f), 1e-5);
    EXPECT_EQ(vecinfer_smooth_factors(acts.layers[0].keys[0], nullptr, VecInferSmoothing::kNone),
              std::vector<float>(d, 1.0f));

    auto throws = [&](const Activations& x, int bits, const std::string& part) {
        try {
            calibrate_vecinfer(x, bits, 0);
            ADD_FAILURE() << "expected an error naming " << part;
        } catch (const std::invalid_argument& e) {
            EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
        }
    };
    throws(acts, 0, "bits");
    throws(acts, 9, "bits");
    throws(Activations{}, 2, "no layers");
    Activations bad = acts;
    bad.layers.push_back(bad.layers[0]);
    bad.layers[1].keys.pop_back();
    throws(bad, 2, "KV heads");
    bad = acts;
    bad.layers[0].keys[1].dim = 16;
    throws(bad, 2, "dim 16");
    bad = acts;
    bad.layers[0].keys[1].data.resize(d);
    throws(bad, 2, "1 key samples");
    throws(activations_of(std::vector<float>(2 * 36, 1.0f), 1, 1, 2, 36), 1, "sub_dim 8");
}

// ---- real model ----------------------------------------------------------------------------

std::string source_root() {
    const std::string file = __FILE__;
    const std::size_t cut = file.rfind("tests/");
    return cut == std::string::npos || cut == 0 ? "." : file.substr(0, cut - 1);
}

std::string env_or(const char* name, const std::string& fallback) {
    const char* v = std::getenv(name);
    return v != nullptr && *v != '\0' ? v : fallback;
}

// Keys of n_tokens of `text_path` (from its start) as the fp16 cache holds them: [L][H][n][d].
std::vector<float> model_keys(const LlamaModel& model, const BPETokenizer& tok,
                              const std::string& text_path, int n_tokens, int* n_out) {
    std::ifstream f(text_path);
    std::stringstream ss;
    ss << f.rdbuf();
    std::vector<int32_t> ids =
        tok.encode(ss.str().substr(0, static_cast<std::size_t>(n_tokens) * 12), false);
    if (static_cast<int>(ids.size()) > n_tokens) ids.resize(n_tokens);
    const int n = static_cast<int>(ids.size());
    KVCacheConfig fp16;
    fp16.method = "fp16";
    auto caches = model.make_caches(fp16, n);
    std::vector<float> logits(model.hparams().n_vocab);
    model.forward(ids.data(), n, caches, logits.data(), false);
    const std::size_t per_layer =
        static_cast<std::size_t>(model.hparams().n_head_kv) * n * model.hparams().head_dim;
    std::vector<float> keys(per_layer * caches.size()), values(per_layer);
    for (std::size_t l = 0; l < caches.size(); ++l)
        caches[l]->dequantize(0, n, keys.data() + l * per_layer, values.data());
    *n_out = n;
    return keys;
}

TEST(VecInferCalibration, BeatsRandomCodebooksOnSmolLM2Keys) {
    const std::string path =
        env_or("VQ_MODEL", source_root() + "/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    const std::string valid = env_or("VQ_WIKITEXT_VALID", "/work/shared/data/wikitext-2/valid.txt");
    const std::string test = env_or("VQ_WIKITEXT", "/work/shared/data/wikitext-2/test.txt");
    if (!std::ifstream(path) || !std::ifstream(valid) || !std::ifstream(test))
        GTEST_SKIP() << "model or WikiText-2 not found (" << path << ", " << valid << ", " << test
                     << ")";
    const auto model = LlamaModel::load(path);
    const BPETokenizer tok(vocab_from_gguf(model->gguf()));
    const int L = model->hparams().n_layer, H = model->hparams().n_head_kv,
              d = model->hparams().head_dim;
    int n_train = 0, n_test = 0;
    const std::vector<float> train_keys = model_keys(*model, tok, valid, 1024, &n_train);
    const std::vector<float> test_keys = model_keys(*model, tok, test, 256, &n_test);
    ASSERT_GT(n_train, 500);
    ASSERT_GT(n_test, 200);
    const Activations train = activations_of(train_keys, L, H, n_train, d);
    for (int bits : {1, 2}) {
        const KVCacheConfig c = config_from(calibrate_vecinfer(train, bits, 42), bits);
        const Errors trained = held_out_errors(c, test_keys, L, H, n_test, d);
        const Errors random =
            held_out_errors(random_codebook_config(c, train, 17), test_keys, L, H, n_test, d);
        std::printf(
            "[SmolLM2 %d layers x %d heads, %d train / %d test keys per head] bits %d: MSE trained "
            "%.4f "
            "random %.4f | score err trained %.4f random %.4f | key-as-query score err trained "
            "%.4f "
            "random %.4f\n",
            L, H, n_train, n_test, bits, trained.mse, random.mse, trained.score, random.score,
            trained.proxy, random.proxy);
        EXPECT_LT(trained.mse, 0.8 * random.mse) << "bits " << bits;
        EXPECT_LT(trained.score, 0.8 * random.score) << "bits " << bits;
        EXPECT_LT(trained.proxy, 0.8 * random.proxy) << "bits " << bits;
    }
}

}  // namespace
}  // namespace veloxquant
