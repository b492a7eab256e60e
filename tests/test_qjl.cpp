// QJL codec (arXiv 2406.03482): unbiasedness over the sketch, the estimator's variance, the code
// layout against a sketch recomputed here, and score == <q, decode(k)>.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/cpu_isa.h"
#include "core/rng.h"
#include "methods/qjl.h"
#include "test_helpers.h"

namespace veloxquant {
namespace {

using vqtest::dot;
using vqtest::gaussian;
using vqtest::norm;

const double kSqrtHalfPi = std::sqrt(std::acos(-1.0) / 2.0);

// Encodes n keys with scalar_stride = stride, scores one query, and decodes.
struct CodecRun {
    std::vector<uint8_t> codes;
    std::vector<float> scalars, decoded, scores;
};

CodecRun run_codec(const KeyCodec& c, const std::vector<float>& keys, int n,
                   const std::vector<float>& q, std::size_t stride) {
    CodecRun r;
    r.codes.assign(c.code_bytes() * n, 0xAB);
    r.scalars.assign(stride * c.num_scalars(), -7.0f);
    c.encode(keys.data(), n, r.codes.data(), r.scalars.data(), stride);
    r.decoded.resize(static_cast<std::size_t>(n) * c.dim());
    c.decode(r.codes.data(), r.scalars.data(), stride, n, r.decoded.data());
    std::vector<float> state(c.query_state_size());
    c.prepare_query(q.data(), state.data());
    r.scores.resize(n);
    c.score(state.data(), r.codes.data(), r.scalars.data(), stride, n, r.scores.data());
    return r;
}

double single_estimate(const QJLCodec& c, const std::vector<float>& k,
                       const std::vector<float>& q) {
    return run_codec(c, k, 1, q, 1).scores[0];
}

TEST(QJL, UnbiasedOverTheSketch) {
    const int d = 64, m = 64, pairs = 10000;
    Rng rng(0x51A7E);
    double sum = 0.0, sum2 = 0.0, sum_true = 0.0;
    for (int p = 0; p < pairs; ++p) {
        const std::vector<float> k = gaussian(rng, d);
        std::vector<float> q = gaussian(rng, d, 0.5);
        for (int j = 0; j < d; ++j) q[j] += k[j];
        const double truth = dot(q.data(), k.data(), d);
        ASSERT_GT(truth, 0.0);
        const QJLCodec codec(d, m, 1000003ull * (p + 1));  // a fresh sketch per pair
        const double err = single_estimate(codec, k, q) - truth;
        sum += err;
        sum2 += err * err;
        sum_true += truth;
    }
    const double mean = sum / pairs;
    const double se = std::sqrt((sum2 / pairs - mean * mean) / (pairs - 1));
    std::printf(
        "QJL d=%d m=%d, %d pairs: mean(estimate - true) = %.4f, SE = %.4f, "
        "mean true = %.2f\n",
        d, m, pairs, mean, se, sum_true / pairs);
    EXPECT_LT(std::fabs(mean), 3.0 * se);
    // Power: a 1% error in the sqrt(pi/2)/m constant would show as a bias of > 3 SE.
    EXPECT_LT(3.0 * se, 0.01 * sum_true / pairs);
}

TEST(QJL, VarianceMatchesTheoryAndShrinksWithSketchDim) {
    // Each sketch row gives X = sqrt(pi/2) ||k|| (s.q) sign(s.k) with E X^2 = pi/2 ||k||^2 ||q||^2,
    // so Var(estimate) = (pi/2 ||k||^2 ||q||^2 - <q, k>^2) / m exactly.
    const int d = 64, draws = 2000;
    Rng rng(0xC0FFEE);
    const std::vector<float> k = gaussian(rng, d);
    std::vector<float> q = gaussian(rng, d);
    for (int j = 0; j < d; ++j) q[j] += 0.7f * k[j];
    const double truth = dot(q.data(), k.data(), d);
    const double nk = norm(k.data(), d), nq = norm(q.data(), d);
    double previous = INFINITY;
    for (int m : {32, 128, 512}) {
        double sum = 0.0, sum2 = 0.0;
        for (int i = 0; i < draws; ++i) {
            const QJLCodec codec(d, m, 7919ull * (i + 1) + static_cast<uint64_t>(m));
            const double e = single_estimate(codec, k, q);
            sum += e;
            sum2 += e * e;
        }
        const double mean = sum / draws;
        const double var = (sum2 - draws * mean * mean) / (draws - 1);
        const double theory = (acos(-1.0) / 2 * nk * nk * nq * nq - truth * truth) / m;
        std::printf("QJL m=%d: variance %.4f (theory %.4f), mean %.3f vs true %.3f\n", m, var,
                    theory, mean, truth);
        EXPECT_NEAR(var / theory, 1.0, 0.15) << "m=" << m;
        EXPECT_LT(var, previous / 2.0) << "m=" << m;
        previous = var;
    }
}

TEST(QJL, CodesMatchReferenceSketchAndScoreMatchesDecode) {
    for (int d : {64, 80, 96, 128, 256}) {
        for (int m : {8, 13, 64, 256}) {
            SCOPED_TRACE("d=" + std::to_string(d) + " m=" + std::to_string(m));
            const uint64_t seed = 0x9E37ull * d + m;
            const QJLCodec codec(d, m, seed);
            ASSERT_EQ(codec.code_bytes(), static_cast<std::size_t>((m + 7) / 8));
            ASSERT_EQ(codec.num_scalars(), 1);

            // The sketch as specified: Rng(seed).normal(), row-major m x d.
            Rng sketch_rng(seed);
            std::vector<double> s(static_cast<std::size_t>(m) * d);
            for (auto& x : s) x = sketch_rng.normal();

            Rng rng(seed ^ 0xDA7A);
            const int n = 5;
            const std::size_t stride = 9;
            const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d, 3.0);
            const std::vector<float> q = gaussian(rng, d);
            const CodecRun r = run_codec(codec, keys, n, q, stride);
            for (std::size_t t = n; t < stride; ++t) EXPECT_EQ(r.scalars[t], -7.0f);

            int compared = 0;
            for (int t = 0; t < n; ++t) {
                const float* k = &keys[static_cast<std::size_t>(t) * d];
                const uint8_t* code = &r.codes[t * codec.code_bytes()];
                const double nk = norm(k, d);
                EXPECT_NEAR(r.scalars[t], nk, 1e-6 * nk);
                std::vector<double> sign(m), ref_decode(d, 0.0);
                double ref_score = 0.0;
                for (int i = 0; i < m; ++i) {
                    double sk = 0.0, sq = 0.0;
                    for (int j = 0; j < d; ++j) {
                        sk += s[static_cast<std::size_t>(i) * d + j] * k[j];
                        sq += s[static_cast<std::size_t>(i) * d + j] * q[j];
                    }
                    const bool bit = (code[i / 8] >> (i % 8)) & 1;
                    if (std::fabs(sk) > 1e-4 * nk) {  // float vs double rounding can't flip it
                        EXPECT_EQ(bit, sk >= 0.0) << "row " << i;
                        ++compared;
                    }
                    sign[i] = bit ? 1.0 : -1.0;
                    ref_score += sq * sign[i];
                    for (int j = 0; j < d; ++j)
                        ref_decode[j] += sign[i] * s[static_cast<std::size_t>(i) * d + j];
                }
                if (m % 8 != 0) {
                    EXPECT_EQ(code[m / 8] >> (m % 8), 0) << "padding bits";
                }
                ref_score *= kSqrtHalfPi / m * nk;

                const float* dec = &r.decoded[static_cast<std::size_t>(t) * d];
                double dec_norm = 0.0, max_diff = 0.0;
                for (int j = 0; j < d; ++j) {
                    ref_decode[j] *= kSqrtHalfPi / m * nk;
                    dec_norm += ref_decode[j] * ref_decode[j];
                    max_diff = std::max(max_diff, std::fabs(dec[j] - ref_decode[j]));
                }
                EXPECT_LT(max_diff, 1e-5 * std::sqrt(dec_norm));

                const double scale = norm(q.data(), d) * nk;
                EXPECT_NEAR(r.scores[t], dot(q.data(), dec, d), 1e-5 * scale);
                EXPECT_NEAR(r.scores[t], ref_score, 1e-5 * scale);
            }
            EXPECT_GT(compared, n * m * 9 / 10);
        }
    }
}

// Every instruction set's tables (nibble tables where nibble_table_sums has a SIMD build, byte
// tables on the generic set) score as the decoded keys do, and score_rows_at gives each row
// score's bits, over whole SIMD blocks of tokens and a tail, for sketches ending mid-byte.
TEST(QJL, EveryInstructionSetScoresAsDecodeAndRowsAsRowByRow) {
    const int n = 53, rows = 5;
    const std::string start = cpu_isa_name();
    for (const int d : {64, 37})
        for (const int m : {64, 100, 256}) {
            Rng rng(d * 11 + m);
            const QJLCodec codec(d, m, 5 + m);
            const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d);
            const std::vector<float> queries = gaussian(rng, static_cast<std::size_t>(rows) * d);
            std::vector<uint8_t> codes(codec.code_bytes() * n);
            std::vector<float> norms(n), dec(keys.size());
            codec.encode(keys.data(), n, codes.data(), norms.data(), n);
            codec.decode(codes.data(), norms.data(), n, n, dec.data());
            const std::size_t qs = codec.query_state_size();
            for (const std::string& isa : cpu_isas()) {
                SCOPED_TRACE(isa + " d " + std::to_string(d) + " m " + std::to_string(m));
                use_cpu_isa(isa);
                std::vector<float> states(rows * qs), one(rows * n), together(rows * n, NAN);
                for (int r = 0; r < rows; ++r) {
                    const float* q = &queries[static_cast<std::size_t>(r) * d];
                    codec.prepare_query(q, &states[r * qs]);
                    codec.score(&states[r * qs], codes.data(), norms.data(), n, n, &one[r * n]);
                    for (int t = 0; t < n; ++t)
                        ASSERT_NEAR(
                            one[r * n + t], dot(q, &dec[static_cast<std::size_t>(t) * d], d),
                            1e-5 * norm(q, d) * norm(&keys[static_cast<std::size_t>(t) * d], d));
                }
                codec.score_rows_at(states.data(), qs, rows, codes.data(), norms.data(), n, n, 0,
                                    together.data(), n);
                ASSERT_EQ(std::memcmp(together.data(), one.data(), one.size() * sizeof(float)), 0);
            }
        }
    use_cpu_isa(start);
}

TEST(QJL, SeedDeterminesCodes) {
    const int d = 128, m = 64, n = 16;
    Rng rng(4242);
    const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d);
    const std::vector<float> q = gaussian(rng, d);
    const CodecRun a = run_codec(QJLCodec(d, m, 11), keys, n, q, n);
    const CodecRun b = run_codec(QJLCodec(d, m, 11), keys, n, q, n);
    const CodecRun c = run_codec(QJLCodec(d, m, 12), keys, n, q, n);
    EXPECT_EQ(a.codes, b.codes);
    EXPECT_EQ(a.scores, b.scores);
    EXPECT_NE(a.codes, c.codes);
}

TEST(QJL, RejectsInvalidArguments) {
    auto message = [](int d, int m) {
        try {
            QJLCodec codec(d, m, 1);
        } catch (const std::invalid_argument& e) {
            return std::string(e.what());
        }
        return std::string("no throw");
    };
    EXPECT_NE(message(64, 0).find("sketch_dim"), std::string::npos);
    EXPECT_NE(message(64, 8193).find("sketch_dim"), std::string::npos);
    EXPECT_NE(message(64, -5).find("sketch_dim"), std::string::npos);
    EXPECT_NE(message(1, 64).find("head dim"), std::string::npos);
    EXPECT_NE(message(1025, 64).find("head dim"), std::string::npos);
    EXPECT_NO_THROW(QJLCodec(2, 1, 1));
    EXPECT_NO_THROW(QJLCodec(1024, 1, 1));
    EXPECT_NO_THROW(QJLCodec(2, 8192, 1));
}

TEST(QJL, ScalingTheKeyScalesTheDecode) {
    const int d = 96, m = 100, n = 8;
    const QJLCodec codec(d, m, 5150);
    Rng rng(777);
    const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d);
    const std::vector<float> q = gaussian(rng, d);
    const CodecRun base = run_codec(codec, keys, n, q, n);
    for (float c : {0.25f, 3.0f, 1e4f, 1e-3f, -2.0f}) {
        std::vector<float> scaled(keys);
        for (auto& x : scaled) x *= c;
        const CodecRun r = run_codec(codec, scaled, n, q, n);
        for (int t = 0; t < n; ++t) {
            const float* a = &base.decoded[static_cast<std::size_t>(t) * d];
            const float* b = &r.decoded[static_cast<std::size_t>(t) * d];
            const double tol = 1e-5 * std::fabs(c) * norm(a, d);
            for (int j = 0; j < d; ++j) ASSERT_NEAR(b[j], c * a[j], tol) << "c=" << c;
        }
    }
}

}  // namespace
}  // namespace veloxquant
