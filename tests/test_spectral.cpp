// spectral: the codec against an independent double reference (projection, brute-force nearest
// level, least-squares scale), scores equal to <q, decode(k)>, the cache (fused vs unfused,
// save/load) and every config error. The codebook, eigen-solver, calibration and bit allocation:
// test_spectral_calibration.cpp; acceptance comparisons: test_spectral_acceptance.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "calibration/spectral_calibration.h"
#include "core/cpu_isa.h"
#include "core/rng.h"
#include "methods/spectral.h"
#include "spectral_test_helpers.h"
#include "test_helpers.h"
#include "veloxquant/veloxquant.h"

namespace veloxquant {
namespace {

using namespace spectral_test;
using vqtest::dot;

// ---------------------------------------------------------------------------------------------
// The codec.

// A codec's calibration on synthetic keys: basis from calibrate_spectral_rotation.
struct Fixture {
    int d;
    std::vector<float> train, test;
    SpectralBasis basis;
    int d_eff;
};

// Queries from the key law with its spectrum reversed, so that the allocation spreads widths
// over 0..8 instead of following the eigenvalues.
Fixture make_fixture(int d, int n_train, int n_test, uint64_t seed) {
    const Synthetic law = make_law(d, seed);
    Synthetic qlaw = law;
    std::reverse(qlaw.lambda.begin(), qlaw.lambda.end());
    Fixture f{d, sample(law, n_train, seed + 2), sample(law, n_test, seed + 3), {}, 0};
    Activations acts = one_head_acts(f.train, d);
    HeadSamples q;
    q.dim = d;
    q.data = sample(qlaw, n_train, seed + 4);
    acts.layers[0].queries.push_back(q);
    f.basis = basis_of(calibrate_spectral_rotation(acts)[0], 0);
    f.d_eff = participation_dim(f.basis.variances.data(), d);
    return f;
}

struct CodecCase {
    int d, sb, nb;
};
// Widths 1..8 for both runs, dropped noise, odd d and odd run lengths.
const CodecCase kCases[] = {{64, 4, 1}, {64, 3, 0}, {64, 2, 2}, {37, 5, 3},
                            {80, 8, 6}, {16, 1, 7}, {64, 6, 4}, {33, 7, 0}};

TEST(SpectralCodec, LayoutBitsAndParticipationDim) {
    const float equal4[] = {1, 1, 1, 1, 0, 0};
    EXPECT_EQ(participation_dim(equal4, 6), 4);
    const float one[] = {5, 0, 0};
    EXPECT_EQ(participation_dim(one, 3), 1);
    const float zero[] = {0, 0};
    EXPECT_EQ(participation_dim(zero, 2), 1);
    const float mixed[] = {4, 2, 1, 1};  // 64 / 22 = 2.91
    EXPECT_EQ(participation_dim(mixed, 4), 3);

    const Fixture f = make_fixture(64, 400, 1, 1);
    for (int nb : {0, 1, 3}) {
        SpectralCodec c(64, 4, nb, f.basis, 13);
        EXPECT_EQ(c.signal_dim(), 13);
        EXPECT_EQ(c.budget_bits(), 4 * 13 + nb * 51);
        EXPECT_EQ(c.code_bytes(), (4u * 13 + 51u * nb + 7) / 8);
        EXPECT_EQ(c.num_scalars(), 1);
        EXPECT_DOUBLE_EQ(c.nominal_bits_per_coordinate(), (4.0 * 13 + nb * 51.0 + 32) / 64);
        int sum = 0;
        for (int b : c.coordinate_bits()) sum += b;
        EXPECT_EQ(sum, c.budget_bits());
    }
    std::printf("[spectral] synthetic law d=64: d_eff = %d\n", f.d_eff);
}

TEST(SpectralCodec, MatchesNaiveReference) {
    for (const CodecCase& cc : kCases) {
        const Fixture f = make_fixture(cc.d, 600, 300, 10 + cc.d + cc.sb);
        const SpectralCodec codec(cc.d, cc.sb, cc.nb, f.basis, f.d_eff);
        const int n = 300;
        const Coded e = encode_all(codec, f.test);
        const std::vector<float> dec = decode_all(codec, e, n);
        int off = 0;
        for (int t = 0; t < n; ++t) {
            const float* k = &f.test[static_cast<std::size_t>(t) * cc.d];
            const std::vector<double> ref =
                reference_decode(f.basis, codec.coordinate_bits(), k, ScaleRule::kSpreadSearch);
            double worst = 0.0;
            for (int j = 0; j < cc.d; ++j)
                worst = std::max(worst, std::fabs(ref[j] - dec[t * cc.d + j]));
            if (worst > 1e-4 * (1.0 + vqtest::norm(k, cc.d))) ++off;
        }
        // A coordinate exactly on a cell boundary may round to the other cell in float.
        EXPECT_LE(off, 1) << "d " << cc.d << " bits " << cc.sb << "/" << cc.nb;
    }
}

TEST(SpectralCodec, ScoreEqualsDotWithDecode) {
    for (const CodecCase& cc : kCases) {
        const Fixture f = make_fixture(cc.d, 600, 200, 20 + cc.d + cc.nb);
        const SpectralCodec codec(cc.d, cc.sb, cc.nb, f.basis, f.d_eff);
        const int n = 200;
        const Coded e = encode_all(codec, f.test);
        const std::vector<float> dec = decode_all(codec, e, n);
        Rng rng(cc.d);
        for (int qi = 0; qi < 4; ++qi) {
            std::vector<float> q = vqtest::gaussian(rng, cc.d, 1.0, 0.3);
            std::vector<float> state(codec.query_state_size()), sc(n);
            codec.prepare_query(q.data(), state.data());
            codec.score(state.data(), e.codes.data(), e.scalars.data(), n, n, sc.data());
            for (int t = 0; t < n; ++t) {
                const float* k = &dec[static_cast<std::size_t>(t) * cc.d];
                const double want = dot(q.data(), k, cc.d);
                EXPECT_NEAR(sc[t], want,
                            1e-5 * vqtest::norm(q.data(), cc.d) * (1.0 + vqtest::norm(k, cc.d)))
                    << "d " << cc.d << " bits " << cc.sb << "/" << cc.nb << " token " << t;
            }
        }
    }
}

// score_rows_at on every instruction set (AVX-512: 16 tokens at a time, rows four at a time)
// against score() row by row, bit for bit, and against the decoded keys' dot products in
// double: the codec cases above and d = 128, 256, token counts below, at and past whole blocks
// of 16, five rows at strides with gaps.
TEST(SpectralCodec, ScoreRowsOnEverySetMatchScoreAndDecode) {
    std::vector<CodecCase> cases(std::begin(kCases), std::end(kCases));
    cases.push_back({128, 4, 1});
    cases.push_back({256, 3, 2});
    const std::string start = cpu_isa_name();
    const int rows = 5;
    double worst = 0.0;
    for (const CodecCase& cc : cases) {
        const int d = cc.d;
        const Fixture f = make_fixture(d, 600, 100, 30 + d + cc.sb);
        const SpectralCodec codec(d, cc.sb, cc.nb, f.basis, f.d_eff);
        Rng rng(d + 5);
        const std::size_t qs = codec.query_state_size() + 3;
        std::vector<float> queries(static_cast<std::size_t>(rows) * d), states(rows * qs, NAN);
        for (int r = 0; r < rows; ++r) {
            const std::vector<float> q = vqtest::gaussian(rng, d, 1.0, 0.3);
            std::copy(q.begin(), q.end(), &queries[static_cast<std::size_t>(r) * d]);
            codec.prepare_query(q.data(), &states[r * qs]);
        }
        for (const int n : {5, 16, 37, 100}) {
            SCOPED_TRACE("d " + std::to_string(d) + " bits " + std::to_string(cc.sb) + "/" +
                         std::to_string(cc.nb) + " n " + std::to_string(n));
            const std::vector<float> keys(f.test.begin(), f.test.begin() + n * d);
            const Coded e = encode_all(codec, keys);
            const std::vector<float> dec = decode_all(codec, e, n);
            const std::size_t ss = n + 2;
            std::vector<float> expected(rows * ss, -1.0f);
            for (int r = 0; r < rows; ++r)
                codec.score(&states[r * qs], e.codes.data(), e.scalars.data(), n, n,
                            &expected[r * ss]);
            for (const std::string& isa : cpu_isas()) {
                use_cpu_isa(isa);
                std::vector<float> scores(rows * ss, -1.0f);
                codec.score_rows_at(states.data(), qs, rows, e.codes.data(), e.scalars.data(), n, n,
                                    0, scores.data(), ss);
                use_cpu_isa(start);
                for (int r = 0; r < rows; ++r)
                    for (int t = 0; t < n; ++t) {
                        const float* q = &queries[static_cast<std::size_t>(r) * d];
                        const float* k = &dec[static_cast<std::size_t>(t) * d];
                        const double err = std::fabs(scores[r * ss + t] - dot(q, k, d)) /
                                           (vqtest::norm(q, d) * (1.0 + vqtest::norm(k, d)));
                        worst = std::max(worst, err);
                        ASSERT_LT(err, 1e-5) << isa << " row " << r << " token " << t;
                        ASSERT_EQ(scores[r * ss + t], expected[r * ss + t])
                            << isa << " row " << r << " token " << t;
                    }
                EXPECT_EQ(scores, expected) << isa << ": wrote outside [0, n)";
            }
        }
    }
    std::printf("[spectral] score_rows_at, worst |s - <q, decode>| / (||q|| (1 + ||k||)): %.2e\n",
                worst);
}

TEST(SpectralCodec, KeyAtTheMeanDecodesToTheMean) {
    const Fixture f = make_fixture(64, 400, 1, 3);
    const SpectralCodec codec(64, 3, 1, f.basis, f.d_eff);
    const Coded e = encode_all(codec, f.basis.mean);
    EXPECT_EQ(e.scalars[0], 0.0f);
    const std::vector<float> dec = decode_all(codec, e, 1);
    for (int j = 0; j < 64; ++j) EXPECT_FLOAT_EQ(dec[j], f.basis.mean[j]);
}

// The per-token scale rule, measured by the query-weighted error it minimises: the spread
// search against its f = 1 restriction (least squares after RMS normalisation), storing the
// RMS itself, and no normalisation; key MSE printed alongside.
TEST(SpectralCodec, ScaleRuleChosenByMeasurement) {
    const Fixture f = make_fixture(64, 2000, 500, 4);
    for (const auto& [sb, nb] : {std::pair{4, 1}, {3, 0}, {2, 1}, {2, 0}}) {
        double werr[4] = {0, 0, 0, 0}, err[4] = {0, 0, 0, 0}, energy = 0.0;
        const std::vector<int> bits = SpectralCodec(64, sb, nb, f.basis, f.d_eff).coordinate_bits();
        for (int t = 0; t < 500; ++t) {
            const float* k = &f.test[static_cast<std::size_t>(t) * 64];
            for (int j = 0; j < 64; ++j) energy += std::pow(k[j] - f.basis.mean[j], 2);
            for (int r = 0; r < 4; ++r) {
                const std::vector<double> x =
                    reference_decode(f.basis, bits, k, static_cast<ScaleRule>(r));
                werr[r] += weighted_error(f.basis, k, x);
                for (int j = 0; j < 64; ++j) err[r] += std::pow(x[j] - k[j], 2);
            }
        }
        std::printf(
            "[spectral] scale rule, synthetic d=64 d_eff=%d bits %d/%d: weighted error "
            "spread search %.4g, RMS + least squares %.4g, store-RMS %.4g, no-normalisation "
            "%.4g (rel MSE %.4f %.4f %.4f %.4f)\n",
            f.d_eff, sb, nb, werr[0], werr[1], werr[2], werr[3], err[0] / energy, err[1] / energy,
            err[2] / energy, err[3] / energy);
        EXPECT_LT(werr[0], werr[1]);
        EXPECT_LT(werr[0], werr[2]);
        EXPECT_LT(werr[0], werr[3]);
        EXPECT_LT(werr[1], werr[3]);
    }
}

TEST(SpectralCodec, ConstructorErrors) {
    const Fixture f = make_fixture(16, 100, 1, 5);
    auto message = [&](int d, int sb, int nb, SpectralBasis b, int d_eff) {
        try {
            SpectralCodec c(d, sb, nb, std::move(b), d_eff);
        } catch (const std::invalid_argument& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    EXPECT_NE(message(16, 0, 1, f.basis, 4).find("signal_bits"), std::string::npos);
    EXPECT_NE(message(16, 9, 1, f.basis, 4).find("signal_bits"), std::string::npos);
    EXPECT_NE(message(16, 4, -1, f.basis, 4).find("noise_bits"), std::string::npos);
    EXPECT_NE(message(16, 4, 9, f.basis, 4).find("noise_bits"), std::string::npos);
    EXPECT_NE(message(16, 4, 1, f.basis, 0).find("d_eff"), std::string::npos);
    EXPECT_NE(message(16, 4, 1, f.basis, 17).find("d_eff"), std::string::npos);
    EXPECT_NE(message(1, 4, 1, f.basis, 1).find("head_dim"), std::string::npos);
    EXPECT_NE(message(15, 4, 1, f.basis, 4).find("basis must be"), std::string::npos);
    SpectralBasis z = f.basis;
    std::fill(z.variances.begin(), z.variances.end(), 0.0f);
    EXPECT_NE(message(16, 4, 1, z, 4).find("variances"), std::string::npos);
    z = f.basis;
    z.query_moments.pop_back();
    EXPECT_NE(message(16, 4, 1, z, 4).find("query_moments [d]"), std::string::npos);
    z = f.basis;
    z.query_moments[3] = -1.0f;
    EXPECT_NE(message(16, 4, 1, z, 4).find("query_moments must be finite"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// The cache.

// Rotations for `layers` layers of `heads` heads, each head calibrated on its own law.
std::vector<FloatArray> synthetic_rotations(int layers, int heads, int d) {
    Activations acts;
    acts.layers.resize(layers);
    for (int l = 0; l < layers; ++l)
        for (int h = 0; h < heads; ++h) {
            HeadSamples s;
            s.dim = d;
            s.data = sample(make_law(d, 1000 + 10 * l + h), 500, 2000 + 10 * l + h);
            acts.layers[l].keys.push_back(s);
        }
    return calibrate_spectral_rotation(acts);
}

KVCacheConfig spectral_config(std::vector<FloatArray> rot, int sb = 4, int nb = 1) {
    KVCacheConfig c;
    c.method = "spectral";
    c.signal_bits = sb;
    c.noise_bits = nb;
    c.value_bits = 4;
    c.rotations = std::move(rot);
    return c;
}

// Keys of layer 1's laws, [heads][n][d], and random values and queries.
struct CacheData {
    std::vector<float> k, v, q;
};

CacheData cache_data(int heads, int group, int n, int n_q, int d) {
    CacheData x;
    for (int h = 0; h < heads; ++h) {
        const std::vector<float> kh = sample(make_law(d, 1000 + 10 + h), n, 50 + h);
        x.k.insert(x.k.end(), kh.begin(), kh.end());
    }
    x.v = vqtest::randn(static_cast<std::size_t>(heads) * n * d, 7);
    x.q = vqtest::randn(static_cast<std::size_t>(heads) * group * n_q * d, 8);
    return x;
}

// Tokens [start, start + count) of a [heads][n][d] array.
std::vector<float> slice(const std::vector<float>& x, int heads, int n, int d, int start,
                         int count) {
    std::vector<float> out;
    for (int h = 0; h < heads; ++h) {
        const auto at = x.begin() + (static_cast<std::ptrdiff_t>(h) * n + start) * d;
        out.insert(out.end(), at, at + static_cast<std::ptrdiff_t>(count) * d);
    }
    return out;
}

TEST(SpectralCache, FusedMatchesUnfusedAndExactAttention) {
    const int H = 2, G = 2, n = 150, nq = 5, d = 64;
    const std::vector<FloatArray> rot = synthetic_rotations(2, H, d);
    const CacheData x = cache_data(H, G, n, nq, d);
    KVCacheConfig fused = spectral_config(rot, 6, 4), unfused = fused;
    fused.value_bits = unfused.value_bits = 16;
    unfused.use_fused_sdpa = false;
    auto a = KVCacheFactory::create(fused, H, d, 512, 1);
    auto b = KVCacheFactory::create(unfused, H, d, 512, 1);
    EXPECT_EQ(a->class_name(), "SpectralQuantKVCache");
    // Two appends of tokens [0, 130) and [130, 150): page boundaries inside both.
    for (const auto& [start, count] : {std::pair{0, n - 20}, {n - 20, 20}}) {
        const std::vector<float> k = slice(x.k, H, n, d, start, count),
                                 v = slice(x.v, H, n, d, start, count);
        a->append(k.data(), v.data(), count);
        b->append(k.data(), v.data(), count);
    }
    const float scale = 1.0f / 8.0f;
    std::vector<float> oa(x.q.size()), ob(x.q.size());
    a->attend(x.q.data(), H * G, nq, oa.data(), scale, true);
    b->attend(x.q.data(), H * G, nq, ob.data(), scale, true);
    EXPECT_LT(vqtest::rel_error(oa, ob), 1e-4);
    const std::vector<float> exact =
        vqtest::reference_attention(x.q, H * G, nq, x.k, x.v, H, n, d, scale, true);
    const double rel = vqtest::rel_error(oa, exact);
    std::printf("[spectral] cache 6/4 bits, fp16 values: attention rel error vs exact %.4f\n", rel);
    EXPECT_LT(rel, 0.05);
    const auto& qa = dynamic_cast<const QuantizedKVCache&>(*a);
    const SpectralCodec codec(d, 6, 4, basis_of(rot[1], 0),
                              participation_dim(basis_of(rot[1], 0).variances.data(), d));
    const SpectralCodec codec1(d, 6, 4, basis_of(rot[1], 1),
                               participation_dim(basis_of(rot[1], 1).variances.data(), d));
    EXPECT_DOUBLE_EQ(qa.key_bits_per_coordinate(),
                     (8.0 * (codec.code_bytes() + codec1.code_bytes()) + 64.0) / (2.0 * d));
}

TEST(SpectralCache, SaveLoadRoundTrip) {
    const int H = 2, G = 2, n = 90, nq = 3, d = 64;
    const CacheData x = cache_data(H, G, n, nq, d);
    auto a =
        KVCacheFactory::create(spectral_config(synthetic_rotations(2, H, d), 3, 1), H, d, 256, 1);
    a->append(x.k.data(), x.v.data(), n);
    const std::string path = vqtest::unique_temp_path("spectral_roundtrip.vqkv");
    a->save(path);
    auto b = KVCache::load(path);
    std::remove(path.c_str());
    EXPECT_EQ(b->class_name(), "SpectralQuantKVCache");
    ASSERT_EQ(b->size(), n);
    std::vector<float> ka(x.k.size()), va(x.v.size()), kb(x.k.size()), vb(x.v.size());
    a->dequantize(0, n, ka.data(), va.data());
    b->dequantize(0, n, kb.data(), vb.data());
    EXPECT_EQ(ka, kb);
    EXPECT_EQ(va, vb);
    std::vector<float> oa(x.q.size()), ob(x.q.size());
    a->attend(x.q.data(), H * G, nq, oa.data(), 0.125f, true);
    b->attend(x.q.data(), H * G, nq, ob.data(), 0.125f, true);
    EXPECT_EQ(oa, ob);
}

std::string create_error(const KVCacheConfig& c, int heads = 2, int d = 16, int layer = 1) {
    try {
        KVCacheFactory::create(c, heads, d, 64, layer);
    } catch (const std::invalid_argument& e) {
        return e.what();
    }
    return "no error";
}

TEST(SpectralConfig, EveryErrorNamesTheFieldOrTheCalibrationCall) {
    const int d = 16;
    const std::vector<FloatArray> good = synthetic_rotations(2, 2, d);
    const std::string call = "calibrate_spectral_rotation";
    ASSERT_EQ(create_error(spectral_config(good)), "no error");

    auto expect = [&](const KVCacheConfig& c, const std::string& what, int heads = 2) {
        const std::string m = create_error(c, heads);
        EXPECT_NE(m.find(what), std::string::npos) << m;
        return m;
    };
    EXPECT_NE(expect(spectral_config({}), "is empty").find(call), std::string::npos);
    EXPECT_NE(expect(spectral_config({good[0]}), "none for layer 1").find(call), std::string::npos);
    EXPECT_NE(expect(spectral_config(good), "none for head 2", 3).find(call), std::string::npos);
    std::vector<FloatArray> bad = good;
    bad[1].shape = {2, d + 1, d};
    EXPECT_NE(expect(spectral_config(bad), "must have shape [kv_heads][19][16]").find(call),
              std::string::npos);
    // The rows of a calibration made before the query moments.
    bad = good;
    bad[1].shape = {2, d + 2, d};
    bad[1].data.resize(static_cast<std::size_t>(2) * (d + 2) * d);
    EXPECT_NE(expect(spectral_config(bad), "older calibration without the query second moments")
                  .find(call),
              std::string::npos);
    bad = good;
    bad[1].data.pop_back();
    expect(spectral_config(bad), "floats, not the");
    bad = good;
    bad[1].data[5] = NAN;
    expect(spectral_config(bad), "NaN or Inf");
    const std::size_t head1 = static_cast<std::size_t>(d + 3) * d;  // head 1's block
    bad = good;
    bad[1].data[head1 + d * d + 3] = -1.0f;
    expect(spectral_config(bad), "negative eigenvalue");
    bad = good;
    bad[1].data[head1 + d * d + 3] = 1e6f;
    expect(spectral_config(bad), "not in descending order");
    bad = good;
    std::fill(bad[1].data.begin() + head1 + d * d, bad[1].data.begin() + head1 + (d + 1) * d, 0.0f);
    expect(spectral_config(bad), "all zero");
    bad = good;
    bad[1].data[head1 + 2 * d + 5] += 0.01f;
    expect(spectral_config(bad), "not orthonormal (rows ");
    bad = good;
    bad[1].data[head1 + (d + 2) * d + 7] = -0.5f;
    expect(spectral_config(bad), "negative query second moment (row 18)");

    KVCacheConfig c = spectral_config(good);
    c.signal_bits = 0;
    expect(c, "signal_bits must be in 1..8");
    c.signal_bits = 9;
    expect(c, "signal_bits");
    c = spectral_config(good);
    c.noise_bits = 9;
    expect(c, "noise_bits");
    c.noise_bits = -1;
    expect(c, "noise_bits");
    // A wrong head dim is a shape error of the rotations.
    EXPECT_NE(create_error(spectral_config(good), 2, 32).find("[kv_heads][35][32]"),
              std::string::npos);
}

}  // namespace
}  // namespace veloxquant
