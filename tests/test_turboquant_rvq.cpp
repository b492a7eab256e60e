// Tests of the turboquant_rvq key codec against the paper's distortion (TurboQuant,
// arXiv 2504.19874, Theorem 1 / the Gaussian Lloyd-Max values), against a reference encoder
// written here (explicit rotation matrix, nearest centroid by argmin, own bit reader), and of
// scoring, determinism, argument checks and scale equivariance.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/cpu_isa.h"
#include "core/lloyd_max.h"
#include "core/rng.h"
#include "core/rotation.h"
#include "methods/turboquant_rvq.h"

namespace veloxquant {
namespace {

// n Gaussian vectors of dimension d; unit length, or with norms spread over [0.05, 20].
std::vector<float> random_keys(uint64_t seed, int n, int d, bool unit) {
    Rng rng(derive_seed(seed, n, d, unit ? 1 : 0, RandomPurpose::kTest));
    std::vector<float> keys(static_cast<std::size_t>(n) * d);
    for (int t = 0; t < n; ++t) {
        float* k = &keys[static_cast<std::size_t>(t) * d];
        double sq = 0.0;
        for (int j = 0; j < d; ++j) {
            k[j] = static_cast<float>(rng.normal());
            sq += static_cast<double>(k[j]) * k[j];
        }
        const double scale = (unit ? 1.0 : 0.05 * std::pow(400.0, rng.uniform())) / std::sqrt(sq);
        for (int j = 0; j < d; ++j) k[j] = static_cast<float>(k[j] * scale);
    }
    return keys;
}

struct Encoded {
    std::vector<uint8_t> codes;
    std::vector<float> norms;
};

Encoded encode_all(const KeyCodec& codec, const std::vector<float>& keys) {
    const int n = static_cast<int>(keys.size() / codec.dim());
    Encoded e{std::vector<uint8_t>(n * codec.code_bytes()), std::vector<float>(n)};
    codec.encode(keys.data(), n, e.codes.data(), e.norms.data(), n);
    return e;
}

std::vector<float> decode_all(const KeyCodec& codec, const Encoded& e) {
    const int n = static_cast<int>(e.norms.size());
    std::vector<float> out(static_cast<std::size_t>(n) * codec.dim());
    codec.decode(e.codes.data(), e.norms.data(), n, n, out.data());
    return out;
}

// Mean over tokens of ||k - decode(encode(k))||^2.
double mean_squared_error(const KeyCodec& codec, const std::vector<float>& keys) {
    const std::vector<float> dec = decode_all(codec, encode_all(codec, keys));
    double sse = 0.0;
    for (std::size_t i = 0; i < keys.size(); ++i) {
        const double e = static_cast<double>(keys[i]) - dec[i];
        sse += e * e;
    }
    return sse / (static_cast<double>(keys.size()) / codec.dim());
}

// Index i of an LSB-first stream of b-bit fields, read one bit at a time.
int read_field(const uint8_t* packed, int i, int bits) {
    int v = 0;
    for (int b = 0; b < bits; ++b) {
        const int bit = i * bits + b;
        v |= ((packed[bit / 8] >> (bit % 8)) & 1) << b;
    }
    return v;
}

// The rotation as an explicit matrix M[r][c], column c being R applied to basis vector c.
std::vector<double> rotation_matrix(int d, bool use_hadamard, uint64_t seed) {
    const Rotation rot(d, use_hadamard, seed);
    std::vector<double> m(static_cast<std::size_t>(d) * d);
    std::vector<float> e(d), col(d);
    for (int c = 0; c < d; ++c) {
        std::fill(e.begin(), e.end(), 0.0f);
        e[c] = 1.0f;
        rot.forward(e.data(), col.data());
        for (int r = 0; r < d; ++r) m[static_cast<std::size_t>(r) * d + c] = col[r];
    }
    return m;
}

const std::vector<float>& stage_centroids(int d, int bits, int stage) {
    return stage == 0 ? rotated_coordinate_codebook(d, bits).centroids
                      : residual_codebook(d, bits, stage).centroids;
}

TEST(TurboQuantRVQ, SingleStageMseMatchesPaper) {
    // Gaussian Lloyd-Max distortions, the paper's D_mse for b = 1..4 on unit vectors. At
    // d = 128 the exact coordinate law (Beta) has lighter tails: about 0-2% lower.
    const double expected[] = {0.363, 0.117, 0.0345, 0.0095};
    for (const bool hadamard : {true, false}) {
        const std::vector<float> keys = random_keys(11, 3000, 128, true);
        for (int bits = 1; bits <= 4; ++bits) {
            const TurboQuantRVQCodec codec(128, bits, 1, hadamard, 1234 + bits);
            const double mse = mean_squared_error(codec, keys);
            std::printf("d=128 %s bits=%d stages=1: MSE %.5f (paper %.4f)\n",
                        hadamard ? "hadamard" : "dense   ", bits, mse, expected[bits - 1]);
            EXPECT_NEAR(mse / expected[bits - 1], 1.0, 0.03) << "bits " << bits;
        }
    }
}

TEST(TurboQuantRVQ, EachResidualStageLowersMse) {
    const std::vector<float> keys = random_keys(12, 2000, 128, true);
    for (int bits = 1; bits <= 2; ++bits) {
        double previous = 1.0;  // a unit vector decoded as zero
        for (int stages = 1; stages <= 3; ++stages) {
            const TurboQuantRVQCodec codec(128, bits, stages, true, 77);
            const double mse = mean_squared_error(codec, keys);
            std::printf("d=128 bits=%d stages=%d: MSE %.6f (x%.3f)\n", bits, stages, mse,
                        mse / previous);
            // A Lloyd-Max stage on the residual's own law removes most of its energy.
            EXPECT_LT(mse, 0.5 * previous) << "bits " << bits << " stages " << stages;
            previous = mse;
        }
    }
}

TEST(TurboQuantRVQ, MatchesReferenceEncoderAndDecoder) {
    struct Shape {
        int d, bits, stages;
        bool hadamard;
    };
    const Shape shapes[] = {{64, 1, 3, true},  {96, 3, 2, true},  {128, 2, 3, false},
                            {80, 4, 1, false}, {112, 5, 2, true}, {37, 7, 2, false},
                            {256, 8, 2, true}};
    for (const Shape& sh : shapes) {
        const int d = sh.d, n = 200;
        const uint64_t seed = 4242 + d;
        const TurboQuantRVQCodec codec(d, sh.bits, sh.stages, sh.hadamard, seed);
        ASSERT_EQ(codec.code_bytes(),
                  static_cast<std::size_t>(sh.stages) * ((d * sh.bits + 7) / 8));
        const std::vector<float> keys = random_keys(13, n, d, false);
        const Encoded e = encode_all(codec, keys);
        const std::vector<float> dec = decode_all(codec, e);
        const std::vector<double> m = rotation_matrix(d, sh.hadamard, seed);

        int mismatches = 0, near_ties = 0;
        for (int t = 0; t < n; ++t) {
            const float* k = &keys[static_cast<std::size_t>(t) * d];
            const uint8_t* code = &e.codes[t * codec.code_bytes()];
            double norm = 0.0;
            for (int j = 0; j < d; ++j) norm += static_cast<double>(k[j]) * k[j];
            norm = std::sqrt(norm);
            ASSERT_NEAR(e.norms[t], norm, 1e-6 * norm);
            std::vector<double> sum(d, 0.0);
            for (int r = 0; r < d; ++r) {
                double u = 0.0;
                for (int c = 0; c < d; ++c) u += m[static_cast<std::size_t>(r) * d + c] * k[c];
                u /= norm;
                for (int s = 0; s < sh.stages; ++s) {
                    const std::vector<float>& cent = stage_centroids(d, sh.bits, s);
                    int best = 0;
                    for (int i = 1; i < static_cast<int>(cent.size()); ++i)
                        if (std::fabs(u - cent[i]) < std::fabs(u - cent[best])) best = i;
                    const int got = read_field(code + s * ((d * sh.bits + 7) / 8), r, sh.bits);
                    if (got != best) {
                        // Float and double rotations may disagree only on a near tie; then
                        // follow the codec's choice so later stages stay comparable.
                        ++mismatches;
                        const double gap = std::fabs(u - cent[got]) - std::fabs(u - cent[best]);
                        ASSERT_LT(gap, 1e-5) << "d " << d << " token " << t << " coord " << r;
                        ++near_ties;
                    }
                    u -= cent[got];
                    sum[r] += cent[got];
                }
            }
            for (int c = 0; c < d; ++c) {
                double ref = 0.0;  // (M^T sum)_c, times the norm
                for (int r = 0; r < d; ++r) ref += m[static_cast<std::size_t>(r) * d + c] * sum[r];
                ref *= norm;
                ASSERT_NEAR(dec[static_cast<std::size_t>(t) * d + c], ref, 2e-6 * norm)
                    << "d " << d << " token " << t << " coord " << c;
            }
        }
        EXPECT_LE(mismatches, n * d * sh.stages / 1000) << "d " << d;
        EXPECT_EQ(mismatches, near_ties);
    }
}

TEST(TurboQuantRVQ, ScoreMatchesDotWithDecode) {
    struct Case {
        int d, bits, stages;
    };
    std::vector<Case> cases;
    for (int d : {64, 80, 96, 112, 128, 256})
        for (int bits = 1; bits <= 4; ++bits)
            for (int stages = 1; stages <= 3; ++stages) cases.push_back({d, bits, stages});
    // The other widths and a d that ends mid-word or on a nibble of padding (d = 100), or
    // mid-byte and mid-pair (d = 37).
    for (int bits = 1; bits <= 8; ++bits) cases.push_back({100, bits, 2});
    for (int bits = 1; bits <= 8; ++bits) cases.push_back({37, bits, 3});

    // Every instruction set's tables and scorer (nibble tables where AVX-512 runs), over whole
    // SIMD blocks of tokens and a tail.
    const int n = 53;
    const std::string start = cpu_isa_name();
    for (const Case& c : cases) {
        const bool hadamard = (c.bits + c.stages) % 2 == 0;
        const TurboQuantRVQCodec codec(c.d, c.bits, c.stages, hadamard, 99 + c.d);
        const std::vector<float> keys = random_keys(14 + c.bits, n, c.d, false);
        const std::vector<float> queries = random_keys(15 + c.stages, 3, c.d, false);
        const Encoded e = encode_all(codec, keys);
        const std::vector<float> dec = decode_all(codec, e);
        std::vector<float> state(codec.query_state_size());
        std::vector<float> scores(n);
        double worst = 0.0;
        for (int qi = 0; qi < 3 * static_cast<int>(cpu_isas().size()); ++qi) {
            use_cpu_isa(cpu_isas()[qi / 3]);
            const float* q = &queries[static_cast<std::size_t>(qi % 3) * c.d];
            codec.prepare_query(q, state.data());
            codec.score(state.data(), e.codes.data(), e.norms.data(), n, n, scores.data());
            double qn = 0.0;
            for (int j = 0; j < c.d; ++j) qn += static_cast<double>(q[j]) * q[j];
            for (int t = 0; t < n; ++t) {
                double dot = 0.0;
                for (int j = 0; j < c.d; ++j)
                    dot += static_cast<double>(q[j]) * dec[static_cast<std::size_t>(t) * c.d + j];
                const double scale = std::sqrt(qn) * e.norms[t];
                worst = std::max(worst, std::fabs(scores[t] - dot) / scale);
            }
        }
        EXPECT_LE(worst, 1e-5) << "d " << c.d << " bits " << c.bits << " stages " << c.stages;
    }
    use_cpu_isa(start);
}

// score_rows_at on every set: each row's scores are score's bits, whichever tables the rows
// hold (nibble tables scored together, or byte and pair tables row by row).
TEST(TurboQuantRVQ, ScoreRowsAtIsScoreRowByRow) {
    const int n = 53, rows = 5;  // a group of four rows and one more
    const std::string start = cpu_isa_name();
    for (const int d : {128, 100, 37})
        for (const int bits : {1, 2, 3, 4}) {
            const TurboQuantRVQCodec codec(d, bits, 2, d == 128, 7 + d);
            const Encoded e = encode_all(codec, random_keys(21 + bits, n, d, false));
            const std::vector<float> queries = random_keys(22, rows, d, false);
            const std::size_t qs = codec.query_state_size();
            for (const std::string& isa : cpu_isas()) {
                use_cpu_isa(isa);
                std::vector<float> states(rows * qs), expected(rows * n), scores(rows * n, NAN);
                for (int r = 0; r < rows; ++r) {
                    codec.prepare_query(&queries[static_cast<std::size_t>(r) * d], &states[r * qs]);
                    codec.score(&states[r * qs], e.codes.data(), e.norms.data(), n, n,
                                &expected[r * n]);
                }
                codec.score_rows_at(states.data(), qs, rows, e.codes.data(), e.norms.data(), n, n,
                                    0, scores.data(), n);
                for (int i = 0; i < rows * n; ++i)
                    ASSERT_EQ(scores[i], expected[i])
                        << isa << " d " << d << " bits " << bits << " row " << i / n;
            }
        }
    use_cpu_isa(start);
}

TEST(TurboQuantRVQ, SameSeedSameCodesOtherSeedOtherRotation) {
    for (const int d : {128, 96}) {  // Hadamard and dense rotation
        const std::vector<float> keys = random_keys(16, 64, d, false);
        const TurboQuantRVQCodec a(d, 3, 2, true, 555), b(d, 3, 2, true, 555);
        const TurboQuantRVQCodec other(d, 3, 2, true, 556);
        const Encoded ea = encode_all(a, keys), eb = encode_all(b, keys);
        const Encoded eo = encode_all(other, keys);
        EXPECT_EQ(ea.codes, eb.codes) << "d " << d;
        EXPECT_EQ(ea.norms, eb.norms) << "d " << d;
        std::size_t differing = 0;
        for (std::size_t i = 0; i < ea.codes.size(); ++i) differing += ea.codes[i] != eo.codes[i];
        EXPECT_GT(differing, ea.codes.size() / 2) << "d " << d;
    }
}

void expect_invalid(int d, int bits, int residuals, const std::string& mentions) {
    try {
        TurboQuantRVQCodec codec(d, bits, residuals, true, 1);
        ADD_FAILURE() << "no exception for d " << d << " bits " << bits << " residuals "
                      << residuals;
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find(mentions), std::string::npos) << e.what();
    }
}

TEST(TurboQuantRVQ, RejectsInvalidArguments) {
    expect_invalid(128, 0, 1, "bits");
    expect_invalid(128, 9, 1, "bits");
    expect_invalid(128, -3, 1, "bits");
    expect_invalid(128, 2, 0, "num_residuals");
    expect_invalid(128, 2, 9, "num_residuals");
    expect_invalid(0, 2, 1, "head_dim");
    expect_invalid(2, 2, 1, "head_dim");
    expect_invalid(1025, 2, 1, "head_dim");
    expect_invalid(-64, 2, 1, "head_dim");
    // The limits themselves are accepted.
    EXPECT_NO_THROW(TurboQuantRVQCodec(3, 8, 1, false, 1));
    EXPECT_NO_THROW(TurboQuantRVQCodec(1024, 1, 1, true, 1));
    EXPECT_NO_THROW(TurboQuantRVQCodec(64, 1, 8, true, 1));
}

TEST(TurboQuantRVQ, ScaledKeyDecodesToScaledDecode) {
    const int d = 96;
    const TurboQuantRVQCodec codec(d, 2, 3, false, 8);
    const std::vector<float> keys = random_keys(17, 100, d, false);
    const std::vector<float> base = decode_all(codec, encode_all(codec, keys));
    // Powers of two scale exactly in float; the others may flip a near-tie code, so they are
    // compared token by token, allowing one token in a hundred to differ.
    for (const float c : {0.25f, 64.0f, 1.0f / 1024.0f, 3.7f, 0.013f}) {
        std::vector<float> scaled(keys);
        for (float& x : scaled) x *= c;
        const std::vector<float> dec = decode_all(codec, encode_all(codec, scaled));
        int off = 0;
        for (int t = 0; t < 100; ++t) {
            double err = 0.0, norm = 0.0;
            for (int j = 0; j < d; ++j) {
                const std::size_t i = static_cast<std::size_t>(t) * d + j;
                err = std::max(err, std::fabs(dec[i] - static_cast<double>(c) * base[i]));
                norm += static_cast<double>(scaled[i]) * scaled[i];
            }
            off += err > 1e-5 * std::sqrt(norm);
        }
        const bool exact = std::fabs(std::log2(c) - std::round(std::log2(c))) == 0.0f;
        EXPECT_LE(off, exact ? 0 : 1) << "c " << c;
    }
}

TEST(TurboQuantRVQ, ZeroKeyHasZeroNormDecodeAndScore) {
    const int d = 64;
    const TurboQuantRVQCodec codec(d, 4, 2, true, 3);
    const std::vector<float> zero(d, 0.0f);
    const Encoded e = encode_all(codec, zero);
    EXPECT_EQ(e.norms[0], 0.0f);
    for (float x : decode_all(codec, e)) EXPECT_EQ(x, 0.0f);
    const std::vector<float> q = random_keys(18, 1, d, false);
    std::vector<float> state(codec.query_state_size());
    codec.prepare_query(q.data(), state.data());
    float score = 1.0f;
    codec.score(state.data(), e.codes.data(), e.norms.data(), 1, 1, &score);
    EXPECT_EQ(score, 0.0f);
}

TEST(TurboQuantRVQ, SizesAndParameterBytes) {
    // d = 128 Hadamard: 128 signs; d = 96 dense: a 96 x 96 matrix. Each stage holds 2^b
    // centroids and 2^b - 1 boundaries, all float32.
    const TurboQuantRVQCodec h(128, 4, 3, true, 5);
    EXPECT_EQ(h.num_scalars(), 1);
    EXPECT_EQ(h.code_bytes(), 3u * 64u);
    EXPECT_EQ(h.parameter_bytes(), 4u * (128u + 3u * (16u + 15u)));
    // Rotated query, the tables' kind, byte tables (larger than the nibble tables).
    EXPECT_EQ(h.query_state_size(), 128u + 1u + 3u * 64u * 256u);
    const TurboQuantRVQCodec g(96, 3, 2, false, 5);
    EXPECT_EQ(g.code_bytes(), 2u * 36u);
    EXPECT_EQ(g.parameter_bytes(), 4u * (96u * 96u + 2u * (8u + 7u)));
    EXPECT_EQ(g.query_state_size(), 96u + 1u + 2u * 48u * 64u);  // ... and pair tables
}

}  // namespace
}  // namespace veloxquant
