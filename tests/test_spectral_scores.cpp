// spectral's query state and scorer (methods/spectral_scores.h) on every instruction set: the
// states each set builds against the generic (double) build, and score_rows_at against score()
// bit for bit and against an independent double reference that reads the fields out of the
// codes itself, decodes the key in double and dots it with the query. Codecs are built directly
// on random orthonormal bases with steep spectra, so that the allocation spans widths 0..8 and
// the groups of every kind (a wide slot alone, runs of narrow slots sharing a 16-entry table).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "core/cpu_isa.h"
#include "core/lloyd_max.h"
#include "core/rng.h"
#include "methods/spectral.h"
#include "spectral_test_helpers.h"
#include "test_helpers.h"

namespace veloxquant {
namespace {

struct Case {
    int d, signal_bits, noise_bits, d_eff;
    double decay;  // lambda_r = exp(-r / (decay d)) + 1e-3
};

SpectralBasis steep_basis(const Case& c, uint64_t seed) {
    const int d = c.d;
    const std::vector<double> u = spectral_test::random_orthonormal(d, seed);
    SpectralBasis b;
    b.basis.assign(u.begin(), u.end());
    Rng rng(seed + 7);
    for (int r = 0; r < d; ++r) {
        b.variances.push_back(static_cast<float>(std::exp(-r / (c.decay * d)) + 1e-3));
        b.mean.push_back(static_cast<float>(0.3 * rng.normal()));
        b.query_moments.push_back(static_cast<float>(0.5 + rng.uniform()));
    }
    return b;
}

// Keys from the basis' own law, mean included, one in eight scaled by 4 (an outlier).
std::vector<float> keys_of(const SpectralBasis& b, int d, int n, uint64_t seed) {
    Rng rng(seed);
    std::vector<float> k(static_cast<std::size_t>(n) * d);
    for (int t = 0; t < n; ++t) {
        const double m = t % 8 == 3 ? 4.0 : 1.0;
        for (int j = 0; j < d; ++j) k[static_cast<std::size_t>(t) * d + j] = b.mean[j];
        for (int r = 0; r < d; ++r) {
            const double g = m * std::sqrt(b.variances[r]) * rng.normal();
            for (int j = 0; j < d; ++j)
                k[static_cast<std::size_t>(t) * d + j] +=
                    static_cast<float>(g * b.basis[static_cast<std::size_t>(r) * d + j]);
        }
    }
    return k;
}

// The key of code `code` and scale s in double, from the stream layout of spectral.h: the
// coded directions by descending width (ascending r among equals), LSB-first fields.
std::vector<double> decode_double(const SpectralCodec& c, const uint8_t* code, float s) {
    const int d = c.dim();
    const SpectralBasis& b = c.basis();
    std::vector<double> k(b.mean.begin(), b.mean.end());
    std::size_t at = 0;
    for (int w = 8; w >= 1; --w)
        for (int r = 0; r < d; ++r) {
            if (c.coordinate_bits()[r] != w) continue;
            unsigned v = 0;
            for (int i = 0; i < w; ++i, ++at) v |= ((code[at / 8] >> (at % 8)) & 1u) << i;
            const double y = static_cast<double>(s) * c.whitening_scales()[r] *
                             gaussian_codebook(w).centroids[v];
            for (int j = 0; j < d; ++j) k[j] += y * b.basis[static_cast<std::size_t>(r) * d + j];
        }
    return k;
}

TEST(SpectralScores, EverySetMatchesTheReferenceAndADoubleDecode) {
    const Case cases[] = {{16, 8, 0, 4, 0.1},    {24, 4, 1, 12, 0.3},  {40, 8, 2, 8, 0.05},
                          {64, 4, 1, 40, 1.0},   {64, 6, 0, 20, 0.15}, {80, 3, 2, 50, 0.5},
                          {128, 4, 1, 100, 2.0}, {128, 8, 1, 30, 0.1}, {256, 5, 2, 90, 0.2},
                          {33, 7, 3, 11, 0.2}};
    const std::string start = cpu_isa_name();
    std::set<int> widths;
    bool wide_group = false, shared_group = false;
    double worst = 0.0, worst_state = 0.0;
    for (const Case& cs : cases) {
        const int d = cs.d;
        const uint64_t seed = 100 + d + cs.signal_bits;
        const SpectralCodec codec(d, cs.signal_bits, cs.noise_bits, steep_basis(cs, seed),
                                  cs.d_eff);
        widths.insert(codec.coordinate_bits().begin(), codec.coordinate_bits().end());
        for (const SpectralCodec::Group& g : codec.groups()) {
            wide_group |= g.bits > 4;
            shared_group |= g.count > 1;
        }
        const int rows = 6, n = 141;  // rows 4 + 2; 8 blocks of 16 and 13 tokens
        const std::size_t qs = codec.query_state_size() + 5;  // gaps of NaN between states
        Rng rng(seed + 1);
        const std::vector<float> queries = vqtest::gaussian(rng, std::size_t{rows} * d, 1.0, 0.2);
        const std::vector<float> keys = keys_of(codec.basis(), d, n, seed + 2);
        const spectral_test::Coded e = spectral_test::encode_all(codec, keys);
        std::vector<double> ref(static_cast<std::size_t>(rows) * n), scale(ref.size());
        for (int t = 0; t < n; ++t) {
            const std::vector<double> k =
                decode_double(codec, &e.codes[t * codec.code_bytes()], e.scalars[t]);
            double kk = 0.0;
            for (double x : k) kk += x * x;
            for (int r = 0; r < rows; ++r) {
                const float* q = &queries[static_cast<std::size_t>(r) * d];
                double s = 0.0;
                for (int j = 0; j < d; ++j) s += q[j] * k[j];
                ref[r * n + t] = s;
                scale[r * n + t] = vqtest::norm(q, d) * (1.0 + std::sqrt(kk));
            }
        }
        use_cpu_isa("generic");
        std::vector<float> generic_states(rows * qs, NAN);
        for (int r = 0; r < rows; ++r)
            codec.prepare_query(&queries[static_cast<std::size_t>(r) * d], &generic_states[r * qs]);
        for (const std::string& isa : cpu_isas()) {
            SCOPED_TRACE("d " + std::to_string(d) + " bits " + std::to_string(cs.signal_bits) +
                         "/" + std::to_string(cs.noise_bits) + " " + isa);
            use_cpu_isa(isa);
            std::vector<float> states(rows * qs, NAN);
            for (int r = 0; r < rows; ++r)
                codec.prepare_query(&queries[static_cast<std::size_t>(r) * d], &states[r * qs]);
            for (const int m : {1, 15, 17, 50, n}) {
                for (const int nr : {1, 3, rows}) {
                    const std::size_t ss = m + 3;
                    std::vector<float> got(nr * ss, -1.0f), want(nr * ss, -1.0f);
                    codec.score_rows_at(states.data(), qs, nr, e.codes.data(), e.scalars.data(), n,
                                        m, 0, got.data(), ss);
                    for (int r = 0; r < nr; ++r)
                        codec.score(&states[r * qs], e.codes.data(), e.scalars.data(), n, m,
                                    &want[r * ss]);
                    ASSERT_EQ(got, want) << "rows " << nr << " tokens " << m;
                    for (int r = 0; r < nr; ++r)
                        for (int t = 0; t < m; ++t) {
                            const double err =
                                std::fabs(got[r * ss + t] - ref[r * n + t]) / scale[r * n + t];
                            worst = std::max(worst, err);
                            ASSERT_LT(err, 1e-5) << "row " << r << " token " << t;
                        }
                }
            }
            use_cpu_isa(start);
            // Each set's tables against the generic build's, relative to the largest entry.
            for (int r = 0; r < rows; ++r) {
                double top = 0.0, diff = 0.0;
                for (std::size_t i = 0; i < codec.query_state_size(); ++i) {
                    top = std::max(top, std::fabs(double{generic_states[r * qs + i]}));
                    diff = std::max(
                        diff, std::fabs(double{states[r * qs + i]} - generic_states[r * qs + i]));
                }
                worst_state = std::max(worst_state, diff / top);
                EXPECT_LT(diff, 1e-5 * top) << "state of row " << r;
            }
        }
    }
    for (int w = 0; w <= 8; ++w) EXPECT_EQ(widths.count(w), 1u) << "no case codes width " << w;
    EXPECT_TRUE(wide_group && shared_group);
    std::printf(
        "[spectral] scores: worst |s - <q, k> in double| / (||q|| (1 + ||k||)) %.2e; worst "
        "state entry off the generic build's %.2e of the largest\n",
        worst, worst_state);
}

}  // namespace
}  // namespace veloxquant
