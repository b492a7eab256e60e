// PolarQuant codec (arXiv 2502.02617): a reference polar transform written here, the code layout
// and indices against it, MSE per bit width, and score == <q, decode(k)>.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/cpu_isa.h"
#include "core/half.h"
#include "core/lloyd_max.h"
#include "core/rng.h"
#include "core/rotation.h"
#include "methods/polarquant.h"
#include "test_helpers.h"

namespace veloxquant {
namespace {

using vqtest::dot;
using vqtest::gaussian;
using vqtest::norm;
using vqtest::read_index;

const double kPi = std::acos(-1.0);

// Reference 4-level polar transform in double: angles[l] holds level l + 1.
struct Polar {
    std::vector<double> angles[4];
    std::vector<double> radii;
};

Polar polar_forward(const std::vector<double>& y) {
    Polar p;
    std::vector<double> r = y;
    for (int level = 0; level < 4; ++level) {
        std::vector<double> next(r.size() / 2);
        for (std::size_t j = 0; j < next.size(); ++j) {
            double a = std::atan2(r[2 * j + 1], r[2 * j]);
            if (level == 0 && a < 0) a += 2 * kPi;
            p.angles[level].push_back(a);
            next[j] = std::sqrt(r[2 * j] * r[2 * j] + r[2 * j + 1] * r[2 * j + 1]);
        }
        r = next;
    }
    p.radii = r;
    return p;
}

std::vector<double> polar_inverse(const Polar& p) {
    std::vector<double> r = p.radii;
    for (int level = 3; level >= 0; --level) {
        std::vector<double> prev(r.size() * 2);
        for (std::size_t j = 0; j < r.size(); ++j) {
            prev[2 * j] = r[j] * std::cos(p.angles[level][j]);
            prev[2 * j + 1] = r[j] * std::sin(p.angles[level][j]);
        }
        r = prev;
    }
    return r;
}


// The documented layout: level-1 indices ((bits + 2) bits), levels 2..4 (bits bits), radii fp16.
struct ParsedCode {
    std::vector<int> indices[4];
    std::vector<float> radii;
};

ParsedCode parse(const uint8_t* code, int d, int bits) {
    ParsedCode p;
    const std::size_t level1_bytes = (d / 2) * (bits + 2) / 8;
    const int upper = d / 4 + d / 8 + d / 16;
    const std::size_t upper_bytes = (upper * bits + 7) / 8;
    for (int j = 0; j < d / 2; ++j) p.indices[0].push_back(read_index(code, j, bits + 2));
    int i = 0;
    for (int level = 1; level < 4; ++level)
        for (int j = 0; j < (d >> (level + 1)); ++j, ++i)
            p.indices[level].push_back(read_index(code + level1_bytes, i, bits));
    const uint8_t* radii = code + level1_bytes + upper_bytes;
    for (int j = 0; j < d / 16; ++j)
        p.radii.push_back(
            half_to_float(static_cast<uint16_t>(radii[2 * j] | radii[2 * j + 1] << 8)));
    return p;
}

struct CodecRun {
    std::vector<uint8_t> codes;
    std::vector<float> scalars, decoded;
};

CodecRun encode_decode(const KeyCodec& c, const std::vector<float>& keys, int n,
                       std::size_t stride) {
    CodecRun r;
    r.codes.assign(c.code_bytes() * n, 0xAB);
    r.scalars.assign(stride * c.num_scalars(), -7.0f);
    c.encode(keys.data(), n, r.codes.data(), r.scalars.data(), stride);
    r.decoded.resize(static_cast<std::size_t>(n) * c.dim());
    c.decode(r.codes.data(), r.scalars.data(), stride, n, r.decoded.data());
    return r;
}

TEST(PolarQuant, ReferenceTransformRoundTrips) {
    Rng rng(31337);
    for (int d : {16, 64, 96, 256}) {
        for (int trial = 0; trial < 20; ++trial) {
            std::vector<double> y(d);
            for (auto& v : y) v = rng.normal();
            const Polar p = polar_forward(y);
            for (double a : p.angles[0]) EXPECT_TRUE(a >= 0 && a < 2 * kPi);
            for (int l = 1; l < 4; ++l)
                for (double a : p.angles[l]) EXPECT_TRUE(a >= 0 && a <= kPi / 2);
            const std::vector<double> back = polar_inverse(p);
            double n2 = 0.0, max_err = 0.0;
            for (int j = 0; j < d; ++j) {
                n2 += y[j] * y[j];
                max_err = std::max(max_err, std::fabs(back[j] - y[j]));
            }
            EXPECT_LT(max_err, 1e-5 * std::sqrt(n2)) << "d=" << d;
        }
    }
}

TEST(PolarQuant, CodesMatchReferenceQuantizer) {
    struct Case {
        int d, bits;
        bool hadamard;
    };
    for (const Case cs : {Case{64, 1, true}, Case{64, 2, true}, Case{64, 4, false},
                          Case{64, 6, true}, Case{96, 2, true}, Case{128, 3, false}}) {
        const int d = cs.d, bits = cs.bits;
        SCOPED_TRACE("d=" + std::to_string(d) + " bits=" + std::to_string(bits));
        const uint64_t seed = 0xB0A7ull * d + bits;
        const PolarQuantCodec codec(d, bits, cs.hadamard, seed);
        const std::size_t expected_bytes =
            (d / 2) * (bits + 2) / 8 + ((d / 4 + d / 8 + d / 16) * bits + 7) / 8 + 2 * (d / 16);
        ASSERT_EQ(codec.code_bytes(), expected_bytes);
        const Rotation rot(d, cs.hadamard, seed);

        Rng rng(seed + 1);
        const int n = 40;
        const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d, 2.0);
        const CodecRun r = encode_decode(codec, keys, n, n);
        int angles = 0, skipped = 0, exact_tokens = 0;
        for (int t = 0; t < n; ++t) {
            const float* k = &keys[static_cast<std::size_t>(t) * d];
            const double nk = norm(k, d);
            std::vector<float> yf(d);
            rot.forward(k, yf.data());
            Polar ref = polar_forward(std::vector<double>(yf.begin(), yf.end()));
            const ParsedCode code = parse(&r.codes[t * codec.code_bytes()], d, bits);
            bool near_boundary = false;
            for (int l = 0; l < 4; ++l) {
                const std::vector<float>& c =
                    polar_angle_codebook(l + 1, l == 0 ? bits + 2 : bits).centroids;
                for (std::size_t j = 0; j < ref.angles[l].size(); ++j) {
                    const double a = ref.angles[l][j];
                    int best = 0;  // nearest centroid, and how far the runner-up is
                    for (std::size_t i = 1; i < c.size(); ++i)
                        if (std::fabs(a - c[i]) < std::fabs(a - c[best]))
                            best = static_cast<int>(i);
                    double margin = INFINITY;
                    for (std::size_t i = 0; i < c.size(); ++i)
                        if (static_cast<int>(i) != best)
                            margin = std::min(margin, std::fabs(a - c[i]) - std::fabs(a - c[best]));
                    if (l == 0) margin = std::min({margin, a, 2 * kPi - a});
                    ++angles;
                    if (margin < 1e-4) {
                        ++skipped;
                        near_boundary = true;
                    } else {
                        EXPECT_EQ(code.indices[l][j], best) << "level " << l + 1 << " angle " << j;
                    }
                    ref.angles[l][j] = c[best];
                }
            }
            for (int j = 0; j < d / 16; ++j) {
                EXPECT_NEAR(code.radii[j], ref.radii[j] / nk, 3e-4);
                ref.radii[j] = code.radii[j] * nk;
            }
            EXPECT_NEAR(r.scalars[t], nk, 1e-6 * nk);
            if (near_boundary) continue;
            // Reference reconstruction: quantized angles, stored radii, rotated back.
            const std::vector<double> yq = polar_inverse(ref);
            std::vector<float> yqf(yq.begin(), yq.end()), expect(d);
            rot.inverse(yqf.data(), expect.data());
            for (int j = 0; j < d; ++j)
                EXPECT_NEAR(r.decoded[static_cast<std::size_t>(t) * d + j], expect[j], 1e-5 * nk);
            ++exact_tokens;
        }
        EXPECT_LT(skipped, angles / 100);
        EXPECT_GT(exact_tokens, n / 2);
    }
}

TEST(PolarQuant, MseOnUnitVectorsFallsWithBits) {
    const int d = 64, n = 2000;
    Rng rng(2502);
    std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d);
    for (int t = 0; t < n; ++t) {
        float* k = &keys[static_cast<std::size_t>(t) * d];
        const double nk = norm(k, d);
        for (int j = 0; j < d; ++j) k[j] = static_cast<float>(k[j] / nk);
    }
    double previous = INFINITY;
    for (int bits = 1; bits <= 5; ++bits) {
        const PolarQuantCodec codec(d, bits, true, 99);
        const CodecRun r = encode_decode(codec, keys, n, n);
        double se = 0.0;
        for (std::size_t i = 0; i < keys.size(); ++i) {
            const double e = r.decoded[i] - keys[i];
            se += e * e;
        }
        const double mse = se / n;
        std::printf("PolarQuant d=%d bits=%d (level-1 %d bits): MSE %.5f, %zu code bytes\n", d,
                    bits, bits + 2, mse, codec.code_bytes());
        EXPECT_LT(mse, previous) << "bits=" << bits;
        if (bits == 3) {
            EXPECT_LT(mse, 0.06);
        }
        previous = mse;
    }
}

// score_rows_at shares each token's unpacking between the rows: each row's scores are score's.
TEST(PolarQuant, ScoreRowsAtIsScoreRowByRow) {
    const int n = 21, rows = 5;
    for (const int d : {64, 128}) {
        const PolarQuantCodec codec(d, 2, true, 5ull + d);
        Rng rng(77ull + d);
        const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d, 3.0);
        const CodecRun r = encode_decode(codec, keys, n, n);
        const std::vector<float> queries = gaussian(rng, static_cast<std::size_t>(rows) * d);
        const std::size_t qs = codec.query_state_size();
        std::vector<float> states(rows * qs), expected(rows * n), scores(rows * n, NAN);
        for (int row = 0; row < rows; ++row) {
            codec.prepare_query(&queries[static_cast<std::size_t>(row) * d], &states[row * qs]);
            codec.score(&states[row * qs], r.codes.data(), r.scalars.data(), n, n,
                        &expected[row * n]);
        }
        codec.score_rows_at(states.data(), qs, rows, r.codes.data(), r.scalars.data(), n, n, 0,
                            scores.data(), n);
        for (int i = 0; i < rows * n; ++i)
            ASSERT_EQ(scores[i], expected[i]) << "d " << d << " row " << i / n;
    }
}

TEST(PolarQuant, ScoreMatchesDecode) {
    for (int d : {64, 80, 96, 112, 128, 256}) {
        for (int bits : {1, 2, 4}) {
            for (bool hadamard : {true, false}) {
                SCOPED_TRACE("d=" + std::to_string(d) + " bits=" + std::to_string(bits) +
                             " hadamard=" + std::to_string(hadamard));
                const PolarQuantCodec codec(d, bits, hadamard, 17ull * d + bits);
                ASSERT_EQ(codec.num_scalars(), 1);
                // q' and its level-1 pair tables
                ASSERT_EQ(codec.query_state_size(),
                          static_cast<std::size_t>(d + d / 2 * (1 << (bits + 2))));
                Rng rng(1000ull * d + bits);
                const int n = 6;
                const std::size_t stride = 10;
                const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d, 5.0);
                const std::vector<float> q = gaussian(rng, d);
                const CodecRun r = encode_decode(codec, keys, n, stride);
                for (std::size_t t = n; t < stride; ++t) EXPECT_EQ(r.scalars[t], -7.0f);
                std::vector<float> state(codec.query_state_size()), scores(n);
                codec.prepare_query(q.data(), state.data());
                codec.score(state.data(), r.codes.data(), r.scalars.data(), stride, n,
                            scores.data());
                for (int t = 0; t < n; ++t) {
                    const float* k = &keys[static_cast<std::size_t>(t) * d];
                    const double expect =
                        dot(q.data(), &r.decoded[static_cast<std::size_t>(t) * d], d);
                    EXPECT_NEAR(scores[t], expect, 1e-5 * norm(q.data(), d) * norm(k, d));
                }
            }
        }
    }
}

// Every instruction set's scorer (AVX-512: 16 tokens at a time, the last n % 16 one by one)
// against the generic build and against an independent score in double: the code parsed here,
// its angles' centroids and radii put through the reference inverse transform, dotted with the
// rotated query. Every bit width (each has its own kernel), head dims 16..256, token counts
// below, at and past whole blocks of 16, several rows at strides with gaps.
TEST(PolarQuant, ScoresOnEverySetMatchGenericAndDoubleReference) {
    struct Case {
        int d, bits;
    };
    const std::string start = cpu_isa_name();
    const int rows = 3;
    double worst_generic = 0.0, worst_reference = 0.0;
    for (const Case cs :
         {Case{16, 1}, Case{16, 3}, Case{64, 1}, Case{64, 2}, Case{64, 5}, Case{128, 1},
          Case{128, 2}, Case{128, 4}, Case{256, 1}, Case{256, 3}, Case{256, 6}}) {
        const int d = cs.d, bits = cs.bits;
        const PolarQuantCodec codec(d, bits, true, 4242ull * d + bits);
        const Rotation rot(d, true, 4242ull * d + bits);
        for (const int n : {5, 16, 37, 100}) {
            SCOPED_TRACE("d=" + std::to_string(d) + " bits=" + std::to_string(bits) +
                         " n=" + std::to_string(n));
            Rng rng(31ull * n + 7ull * d + bits);
            const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d, 2.0);
            const std::vector<float> queries = gaussian(rng, static_cast<std::size_t>(rows) * d);
            const CodecRun r = encode_decode(codec, keys, n, n);
            // The reference: <R q, y_hat> in double, y_hat from the parsed code.
            std::vector<double> reference(static_cast<std::size_t>(rows) * n), scale(reference);
            for (int t = 0; t < n; ++t) {
                const ParsedCode code = parse(&r.codes[t * codec.code_bytes()], d, bits);
                Polar p;
                for (int l = 0; l < 4; ++l) {
                    const std::vector<float>& c =
                        polar_angle_codebook(l + 1, l == 0 ? bits + 2 : bits).centroids;
                    for (int i : code.indices[l]) p.angles[l].push_back(c[i]);
                }
                for (float radius : code.radii) p.radii.push_back(double{radius} * r.scalars[t]);
                const std::vector<double> y = polar_inverse(p);
                double ny = 0.0;
                for (double v : y) ny += v * v;
                for (int row = 0; row < rows; ++row) {
                    std::vector<float> qr(d);
                    rot.forward(&queries[static_cast<std::size_t>(row) * d], qr.data());
                    double s = 0.0;
                    for (int j = 0; j < d; ++j) s += qr[j] * y[j];
                    reference[row * n + t] = s;
                    scale[row * n + t] = norm(qr.data(), d) * std::sqrt(ny) + 1e-30;
                }
            }
            const std::size_t qs = codec.query_state_size() + 5, ss = n + 3;
            std::vector<float> states(rows * qs, NAN);
            for (int row = 0; row < rows; ++row)
                codec.prepare_query(&queries[static_cast<std::size_t>(row) * d], &states[row * qs]);
            std::map<std::string, std::vector<float>> scores;
            for (const std::string& isa : cpu_isas()) {
                use_cpu_isa(isa);
                scores[isa].assign(rows * ss, -1.0f);
                codec.score_rows_at(states.data(), qs, rows, r.codes.data(), r.scalars.data(), n, n,
                                    0, scores[isa].data(), ss);
                use_cpu_isa(start);
            }
            for (const auto& [isa, s] : scores)
                for (int row = 0; row < rows; ++row) {
                    for (int t = 0; t < n; ++t) {
                        const double to_reference =
                            std::fabs(s[row * ss + t] - reference[row * n + t]) /
                            scale[row * n + t];
                        const double to_generic =
                            std::fabs(s[row * ss + t] - scores["generic"][row * ss + t]) /
                            scale[row * n + t];
                        worst_reference = std::max(worst_reference, to_reference);
                        worst_generic = std::max(worst_generic, to_generic);
                        ASSERT_LT(to_reference, 2e-6) << isa << " row " << row << " token " << t;
                        ASSERT_LT(to_generic, 2e-6) << isa << " row " << row << " token " << t;
                    }
                    EXPECT_EQ(s[row * ss + n], -1.0f) << isa << ": wrote past n";
                }
        }
    }
    std::printf(
        "polarquant scores, worst |s - s_ref| / (||q|| ||k_hat||): %.2e against double, "
        "%.2e against the generic build\n",
        worst_reference, worst_generic);
}

TEST(PolarQuant, LevelOneAnglesCoverTheFullCircle) {
    const int d = 128, bits = 2, n = 500;
    const PolarQuantCodec codec(d, bits, false, 606);
    Rng rng(707);
    const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d);
    const CodecRun r = encode_decode(codec, keys, n, n);
    const int cells = 1 << (bits + 2);
    std::vector<int> count(cells, 0);
    for (int t = 0; t < n; ++t) {
        const ParsedCode code = parse(&r.codes[t * codec.code_bytes()], d, bits);
        for (int idx : code.indices[0]) ++count[idx];
    }
    const double expected = static_cast<double>(n) * (d / 2) / cells;
    int upper_half = 0;
    for (int i = 0; i < cells; ++i) {
        EXPECT_NEAR(count[i], expected, 0.15 * expected) << "cell " << i;
        if (i >= cells / 2) upper_half += count[i];
    }
    EXPECT_NEAR(upper_half / (expected * cells), 0.5, 0.03);  // angles in [pi, 2pi) are used
}

TEST(PolarQuant, SeedDeterminesCodes) {
    for (bool hadamard : {true, false}) {
        const int d = 128, n = 12;
        Rng rng(88);
        const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d);
        const CodecRun a = encode_decode(PolarQuantCodec(d, 2, hadamard, 5), keys, n, n);
        const CodecRun b = encode_decode(PolarQuantCodec(d, 2, hadamard, 5), keys, n, n);
        const CodecRun c = encode_decode(PolarQuantCodec(d, 2, hadamard, 6), keys, n, n);
        EXPECT_EQ(a.codes, b.codes);
        EXPECT_EQ(a.decoded, b.decoded);
        EXPECT_NE(a.codes, c.codes);
    }
}

TEST(PolarQuant, RejectsInvalidArguments) {
    auto message = [](int d, int bits) {
        try {
            PolarQuantCodec codec(d, bits, true, 1);
        } catch (const std::invalid_argument& e) {
            return std::string(e.what());
        }
        return std::string("no throw");
    };
    EXPECT_NE(message(72, 2).find("head dim 72"), std::string::npos);
    EXPECT_NE(message(100, 2).find("head dim 100"), std::string::npos);
    EXPECT_NE(message(0, 2).find("head dim 0"), std::string::npos);
    EXPECT_NE(message(-16, 2).find("head dim -16"), std::string::npos);
    EXPECT_NE(message(2048, 2).find("head dim 2048"), std::string::npos);
    EXPECT_NE(message(64, 0).find("bits"), std::string::npos);
    EXPECT_NE(message(64, 7).find("bits"), std::string::npos);
    EXPECT_NO_THROW(PolarQuantCodec(16, 1, true, 1));
    EXPECT_NO_THROW(PolarQuantCodec(80, 6, true, 1));
}

TEST(PolarQuant, ScalingTheKeyScalesTheDecode) {
    const int d = 128, n = 20;
    const PolarQuantCodec codec(d, 3, true, 4096);
    Rng rng(909);
    const std::vector<float> keys = gaussian(rng, static_cast<std::size_t>(n) * d);
    const CodecRun base = encode_decode(codec, keys, n, n);
    // 1e5 puts ||k|| ~ 1.1e6, far beyond fp16's range: radii are stored relative to ||k||.
    for (float c : {0.25f, 3.0f, 1e-3f, 1e5f}) {
        std::vector<float> scaled(keys);
        for (auto& x : scaled) x *= c;
        const CodecRun r = encode_decode(codec, scaled, n, n);
        for (int t = 0; t < n; ++t) {
            const float* a = &base.decoded[static_cast<std::size_t>(t) * d];
            const float* b = &r.decoded[static_cast<std::size_t>(t) * d];
            const double tol = 1e-3 * c * norm(&keys[static_cast<std::size_t>(t) * d], d);
            for (int j = 0; j < d; ++j) ASSERT_NEAR(b[j], c * a[j], tol) << "c=" << c;
        }
    }
}

}  // namespace
}  // namespace veloxquant
