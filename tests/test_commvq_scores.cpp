// commvq's key scorers on every instruction set (core/cpu_isa.h): with RoPE, the codeword sum
// built once per token for all rows and turned by the position (methods/commvq_scores.h);
// without, per-row lookup tables of <q, codeword> (CommVQCodec::prepare_query). Each against
// the generic build and against an independent score in double: the code's indices read bit by
// bit, the codewords summed, RoPE applied at the token's position with the angle in double,
// dotted with the query. Fresh random codes and queries, head dims 32..128 (and 48, not a
// multiple of 16, and group_dim 4, which the AVX-512 build leaves to the generic one), token
// counts below, at and past 16, runs that cross several 64-position phase blocks, more rows
// than one pass takes, and RoPE on fewer pairs than the head has, ending inside a group (the
// SIMD builds' partial masks).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/cpu_isa.h"
#include "methods/commvq.h"
#include "test_helpers.h"

namespace veloxquant {
namespace {

using vqtest::read_index;

struct Shape {
    int d, stages, codewords, group_dim, rope_pairs;  // rope_pairs 0: no RoPE
};

// <q, RoPE_pos(sum of the code's codewords)> in double, and ||q|| ||key|| as its scale.
std::pair<double, double> reference_score(const std::vector<float>& book, const Shape& s,
                                          const uint8_t* code, const float* q, double pos) {
    const int G = s.d / s.group_dim;
    int bits = 0;
    while ((1 << bits) < s.codewords) ++bits;
    std::vector<double> k(s.d, 0.0);
    for (int st = 0; st < s.stages; ++st)
        for (int g = 0; g < G; ++g) {
            const int c = read_index(code, st * G + g, bits);
            for (int j = 0; j < s.group_dim; ++j)
                k[g * s.group_dim + j] +=
                    book[((static_cast<std::size_t>(st) * G + g) * s.codewords + c) * s.group_dim +
                         j];
        }
    for (int i = 0; i < s.rope_pairs; ++i) {
        const double a = pos * std::pow(10000.0, -2.0 * i / s.d), x = k[2 * i], y = k[2 * i + 1];
        k[2 * i] = x * std::cos(a) - y * std::sin(a);
        k[2 * i + 1] = x * std::sin(a) + y * std::cos(a);
    }
    double dot = 0.0, kk = 0.0;
    for (int j = 0; j < s.d; ++j) dot += q[j] * k[j], kk += k[j] * k[j];
    return {dot, vqtest::norm(q, s.d) * std::sqrt(kk) + 1e-30};
}

TEST(CommVQScores, EverySetMatchesGenericAndDoubleReference) {
    struct Run {
        int n, pos0;
    };
    const std::string start = cpu_isa_name();
    const int rows = 6;  // more than one pass of four
    double worst_generic = 0.0, worst_reference = 0.0;
    for (const Shape s :
         {Shape{64, 2, 256, 8, 32}, Shape{128, 3, 256, 8, 64}, Shape{128, 1, 256, 8, 40},
          Shape{32, 4, 256, 8, 16}, Shape{48, 2, 16, 4, 24}, Shape{64, 2, 16, 8, 32},
          Shape{128, 2, 256, 8, 0}, Shape{64, 4, 256, 8, 0}, Shape{64, 3, 16, 8, 0},
          Shape{64, 2, 256, 8, 13}, Shape{128, 2, 16, 8, 21}, Shape{32, 2, 256, 8, 3}}) {
        const int G = s.d / s.group_dim;
        std::mt19937_64 gen(1000ull * s.d + 10 * s.stages + s.rope_pairs);
        std::normal_distribution<float> normal;
        std::vector<float> book(static_cast<std::size_t>(s.stages) * G * s.codewords * s.group_dim);
        for (auto& w : book) w = normal(gen);
        std::vector<double> freq(s.rope_pairs);
        for (int i = 0; i < s.rope_pairs; ++i) freq[i] = std::pow(10000.0, -2.0 * i / s.d);
        const CommVQCodec codec(s.d, book.data(), s.stages, G, s.codewords, s.group_dim, freq);
        const std::size_t cb = codec.code_bytes();
        for (const Run run :
             {Run{5, 0}, Run{16, 64}, Run{37, 1000}, Run{100, 50}, Run{200, 4070}}) {
            SCOPED_TRACE("d=" + std::to_string(s.d) + " stages=" + std::to_string(s.stages) +
                         " C=" + std::to_string(s.codewords) +
                         " rope_pairs=" + std::to_string(s.rope_pairs) +
                         " n=" + std::to_string(run.n) + " pos0=" + std::to_string(run.pos0));
            const int n = run.n;
            std::vector<uint8_t> codes(cb * n);
            for (auto& b : codes) b = static_cast<uint8_t>(gen());
            std::vector<float> queries(static_cast<std::size_t>(rows) * s.d);
            for (auto& x : queries) x = normal(gen);
            const std::size_t qs = codec.query_state_size() + 3, ss = n + 5;
            std::vector<float> states(rows * qs, NAN);
            for (int r = 0; r < rows; ++r) codec.prepare_query(&queries[r * s.d], &states[r * qs]);
            std::map<std::string, std::vector<float>> scores;
            for (const std::string& isa : cpu_isas()) {
                use_cpu_isa(isa);
                auto& out = scores[isa];
                out.assign(rows * ss, -1.0f);
                codec.score_rows_at(states.data(), qs, rows, codes.data(), nullptr, n, n, run.pos0,
                                    out.data(), ss);
                // One row alone scores as it does among the others, to the bit.
                std::vector<float> one(n);
                codec.score_at(&states[4 * qs], codes.data(), nullptr, n, n, run.pos0, one.data());
                for (int t = 0; t < n; ++t) ASSERT_EQ(one[t], out[4 * ss + t]) << isa << " " << t;
                use_cpu_isa(start);
            }
            for (int r = 0; r < rows; ++r)
                for (int t = 0; t < n; ++t) {
                    const double pos = s.rope_pairs > 0 ? run.pos0 + t : 0.0;
                    const auto [ref, scale] =
                        reference_score(book, s, &codes[t * cb], &queries[r * s.d], pos);
                    for (const auto& [isa, out] : scores) {
                        const double to_ref = std::fabs(out[r * ss + t] - ref) / scale;
                        const double to_generic =
                            std::fabs(out[r * ss + t] - scores["generic"][r * ss + t]) / scale;
                        worst_reference = std::max(worst_reference, to_ref);
                        worst_generic = std::max(worst_generic, to_generic);
                        ASSERT_LT(to_ref, 2e-6) << isa << " row " << r << " token " << t;
                        ASSERT_LT(to_generic, 2e-6) << isa << " row " << r << " token " << t;
                        // Without RoPE every set adds the table entries in one order.
                        if (s.rope_pairs == 0)
                            ASSERT_EQ(out[r * ss + t], scores["generic"][r * ss + t]) << isa;
                    }
                }
            for (const auto& [isa, out] : scores)
                for (int r = 0; r < rows; ++r)
                    EXPECT_EQ(out[r * ss + n], -1.0f) << isa << ": wrote past n";
        }
    }
    std::printf(
        "commvq scores, worst |s - s_ref| / (||q|| ||k_hat||): %.2e against double, %.2e "
        "against the generic build\n",
        worst_reference, worst_generic);
}

}  // namespace
}  // namespace veloxquant
