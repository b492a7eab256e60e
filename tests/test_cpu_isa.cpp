// The CPU kernel sets (core/cpu_isa.h) and the kernels compiled for each of them, on every set
// this CPU runs: the value accumulation against an independent double-precision sum of the
// decoded values, the key scorers' table sums bit for bit against the scalar order they
// document, fp16 key scores against a double dot product, the online softmax against a
// double-precision one. (matmul's kernels are checked set by set in test_llama.cpp, the codecs'
// scores against decoded keys in their own tests.)
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/online_softmax.h"
#include "core/bitpack.h"
#include "core/cpu_isa.h"
#include "methods/byte_table_sums.h"
#include "methods/fp16_codec.h"
#include "methods/nibble_table_sums.h"
#include "methods/value_codec.h"

using namespace veloxquant;

TEST(CpuIsa, ListsTheSetsBestFirstAndRefusesUnknownOnes) {
    const std::vector<std::string> sets = cpu_isas();
    ASSERT_FALSE(sets.empty());
    EXPECT_EQ(sets.back(), "generic");
    const std::string start = cpu_isa_name();  // the best, unless VQ_CPU_ISA chose another
    EXPECT_THROW(use_cpu_isa("avx9000"), std::invalid_argument);
    EXPECT_EQ(std::string(cpu_isa_name()), start) << "a refused name changed the set";
    use_cpu_isa("generic");
    EXPECT_EQ(cpu_isa(), CpuIsa::kGeneric);
    use_cpu_isa("");
    EXPECT_EQ(std::string(cpu_isa_name()), sets.front());
    use_cpu_isa(start);
}

// acc[r] = sum_t w[r][t] value_t through accumulate + finalize, against sum_t w[r][t] decode(t)
// in double: bit widths with and without the byte tables (dims divisible by 8 or not), fp16,
// rows of a GQA group and of a prefill chunk, zero weights (skipped tokens) among them.
TEST(CpuIsa, ValueAccumulationMatchesTheDecodedSumOnEverySet) {
    std::mt19937 gen(11);
    std::normal_distribution<float> normal;
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    const std::string start = cpu_isa_name();
    for (const std::string& isa : cpu_isas()) {
        use_cpu_isa(isa);
        for (const int bits : {1, 2, 3, 4, 8, 16}) {
            for (const int dim : {64, 100, 128}) {
                const ValueCodec codec(dim, bits, /*use_hadamard=*/true, 99);
                const int n = 37;
                std::vector<float> values(static_cast<std::size_t>(n) * dim);
                for (auto& v : values) v = normal(gen);
                std::vector<uint8_t> codes(n * codec.code_bytes());
                std::vector<float> scalars(n);
                codec.encode(values.data(), n, codes.data(), scalars.data(), n);
                std::vector<float> decoded(values.size());
                codec.decode(codes.data(), scalars.data(), n, n, decoded.data());
                for (const int rows : {1, 4, 5}) {
                    std::vector<float> w(static_cast<std::size_t>(rows) * n);
                    for (std::size_t i = 0; i < w.size(); ++i)
                        w[i] = i % 7 == 3 ? 0.0f : uniform(gen);
                    std::vector<std::vector<float>> acc(rows, std::vector<float>(dim, 0.0f));
                    std::vector<float*> acc_ptr;
                    for (auto& a : acc) acc_ptr.push_back(a.data());
                    codec.accumulate(w.data(), n, rows, codes.data(), scalars.data(), n,
                                     acc_ptr.data());
                    for (int r = 0; r < rows; ++r) {
                        std::vector<float> out(dim);
                        codec.finalize(acc[r].data(), out.data());
                        double err2 = 0.0, ref2 = 0.0;
                        for (int j = 0; j < dim; ++j) {
                            double ref = 0.0;
                            for (int t = 0; t < n; ++t)
                                ref += static_cast<double>(w[r * n + t]) *
                                       decoded[static_cast<std::size_t>(t) * dim + j];
                            err2 += (out[j] - ref) * (out[j] - ref);
                            ref2 += ref * ref;
                        }
                        EXPECT_LT(std::sqrt(err2 / ref2), 1e-5)
                            << isa << " bits " << bits << " dim " << dim << " rows " << rows
                            << " row " << r;
                    }
                }
            }
        }
    }
    use_cpu_isa(start);
}

// The packed-code value sum (methods/value_sum.h) through accumulate, in the codec's rotated
// domain, on every set against sum_t w[r][t] * scale_t * centroid[code_t[j]] in double and
// against the generic set's sum: bits 1, 2 and 4 at head dims on and off the vector grids (8 on
// AVX2, 16 and the 4-vector block of 64 on AVX-512), token counts around the widths and the
// kernel's block of 64, 1 to 9 rows (its groups of 4 and their remainders), weights over 24
// orders of magnitude with zeros among them, in some rows only and in every row of some tokens.
TEST(CpuIsa, PackedValueSumMatchesDoublePrecisionOnEverySet) {
    std::mt19937 gen(15);
    std::normal_distribution<float> normal;
    std::uniform_real_distribution<float> exponent(-12.0f, 12.0f);
    const std::string start = cpu_isa_name();
    for (const int bits : {1, 2, 4})
        for (const int dim : {16, 24, 48, 64, 80, 96, 128, 256}) {
            const ValueCodec codec(dim, bits, /*use_hadamard=*/dim % 16 == 0, 7);
            const int n = dim % 3 == 0 ? 131 : 37;
            std::vector<float> values(static_cast<std::size_t>(n) * dim);
            for (auto& v : values) v = normal(gen);
            std::vector<uint8_t> codes(n * codec.code_bytes());
            std::vector<float> scalars(n);
            codec.encode(values.data(), n, codes.data(), scalars.data(), n);
            for (const int rows : {1, 3, 4, 9}) {
                std::vector<float> w(static_cast<std::size_t>(rows) * n);
                for (std::size_t i = 0; i < w.size(); ++i)
                    w[i] = (i % 11 == 4 || i % n % 17 == 5) ? 0.0f : std::pow(10.0f, exponent(gen));
                std::vector<double> ref(static_cast<std::size_t>(rows) * dim, 0.0);
                for (int r = 0; r < rows; ++r)
                    for (int t = 0; t < n; ++t)
                        for (int j = 0; j < dim; ++j)
                            ref[r * dim + j] +=
                                static_cast<double>(w[r * n + t]) * scalars[t] *
                                codec.codebook()->centroids[read_packed(
                                    codes.data() + t * codec.code_bytes(), j, bits)];
                std::vector<float> generic;
                const std::vector<std::string> sets = cpu_isas();
                for (auto it = sets.rbegin(); it != sets.rend(); ++it) {  // generic first
                    const std::string& isa = *it;
                    use_cpu_isa(isa);
                    std::vector<float> acc(static_cast<std::size_t>(rows) * dim, 0.5f);
                    std::vector<float*> acc_ptr;
                    for (int r = 0; r < rows; ++r) acc_ptr.push_back(&acc[r * dim]);
                    codec.accumulate(w.data(), n, rows, codes.data(), scalars.data(), n,
                                     acc_ptr.data());
                    if (isa == "generic") generic = acc;
                    for (int r = 0; r < rows; ++r) {
                        double err2 = 0.0, ref2 = 0.0;
                        for (int j = 0; j < dim; ++j) {
                            const double e = acc[r * dim + j] - 0.5 - ref[r * dim + j];
                            err2 += e * e;
                            ref2 += ref[r * dim + j] * ref[r * dim + j];
                        }
                        EXPECT_LT(std::sqrt(err2 / ref2), 1e-5)
                            << isa << " bits " << bits << " dim " << dim << " rows " << rows
                            << " row " << r;
                    }
                    if (isa != "generic")
                        for (int r = 0; r < rows; ++r) {
                            double err2 = 0.0, ref2 = 0.0;
                            for (int j = 0; j < dim; ++j) {
                                const double e = acc[r * dim + j] - generic[r * dim + j];
                                err2 += e * e;
                                ref2 += ref[r * dim + j] * ref[r * dim + j];
                            }
                            EXPECT_LT(std::sqrt(err2 / ref2), 1e-5)
                                << isa << " against generic, bits " << bits << " dim " << dim
                                << " rows " << rows << " row " << r;
                        }
                }
            }
        }
    use_cpu_isa(start);
}

// fp16 keys: score_rows_at on every set against a double dot product with the decoded keys, at
// head dims on and off the AVX-512 path's grid of 16 and the AVX2 path's of 8, for 1 to 7 rows
// (scores start as NaN, so a token left unscored fails), and score() as row 0 of it.
TEST(CpuIsa, Fp16ScoresMatchTheDecodedDotOnEverySet) {
    std::mt19937 gen(5);
    std::normal_distribution<float> normal;
    const std::string start = cpu_isa_name();
    for (const std::string& isa : cpu_isas()) {
        use_cpu_isa(isa);
        for (const int d : {8, 40, 48, 100, 128}) {
            const FP16Codec codec(d);
            const int n = 37;
            std::vector<float> keys(static_cast<std::size_t>(n) * d);
            for (auto& k : keys) k = normal(gen);
            std::vector<uint8_t> codes(n * codec.code_bytes());
            codec.encode(keys.data(), n, codes.data(), nullptr, 0);
            std::vector<float> decoded(keys.size());
            codec.decode(codes.data(), nullptr, 0, n, decoded.data());
            for (const int rows : {1, 3, 4, 5, 7}) {
                std::vector<float> states(static_cast<std::size_t>(rows) * d);
                for (auto& q : states) q = normal(gen);
                std::vector<float> scores(static_cast<std::size_t>(rows) * n, std::nanf(""));
                codec.score_rows_at(states.data(), d, rows, codes.data(), nullptr, 0, n, 0,
                                    scores.data(), n);
                for (int r = 0; r < rows; ++r)
                    for (int t = 0; t < n; ++t) {
                        double ref = 0.0, size = 0.0;
                        for (int j = 0; j < d; ++j) {
                            const double p = static_cast<double>(states[r * d + j]) *
                                             decoded[static_cast<std::size_t>(t) * d + j];
                            ref += p;
                            size += std::fabs(p);
                        }
                        EXPECT_NEAR(scores[r * n + t], ref, 1e-6 * size)
                            << isa << " d " << d << " rows " << rows << " row " << r << " token "
                            << t;
                    }
                std::vector<float> one(n);
                codec.score(states.data(), codes.data(), nullptr, 0, n, one.data());
                for (int t = 0; t < n; ++t) EXPECT_EQ(one[t], scores[t]) << isa << " d " << d;
            }
        }
    }
    use_cpu_isa(start);
}

// Table sums over codes of 1..130 bytes (whole 4-byte words and every remainder, one chunk of
// nibble_table_sums' 16 words and more), at a stride with unused bytes between tokens, for
// token counts below, at and past the SIMD widths (8, 16). Tables and codes are fresh random
// values, so a dropped or repeated lookup or token changes a sum; sums start as NaN, so an
// unwritten token fails too.
struct TableSumCase {
    std::size_t bytes, stride;
    int n;
};

std::vector<TableSumCase> table_sum_cases() {
    std::vector<TableSumCase> cases;
    for (const std::size_t bytes : {1, 2, 3, 4, 5, 7, 8, 13, 16, 17, 32, 64, 65, 130})
        for (const int n : {1, 7, 9, 11, 16, 17, 23, 30, 40, 64})
            cases.push_back({bytes, bytes + n % 5, n});
    return cases;
}

// ... for 1 to 9 query rows (every remainder of the AVX-512 build's groups of 4 rows and the
// AVX2 build's of 3), tables and sums at strides with room between rows.
TEST(CpuIsa, NibbleTableSumsMatchTheScalarOrderOnEverySet) {
    std::mt19937 gen(12);
    std::normal_distribution<float> normal;
    const std::string start = cpu_isa_name();
    for (const TableSumCase& c : table_sum_cases()) {
        const int rows = 1 + c.n % 9;
        const std::size_t table_stride = 2 * c.bytes * 16 + 5, sum_stride = c.n + 3;
        std::vector<float> tables(rows * table_stride);
        for (auto& x : tables) x = normal(gen);
        std::vector<uint8_t> codes(c.n * c.stride);
        for (auto& b : codes) b = static_cast<uint8_t>(gen());
        std::vector<float> expected(rows * sum_stride, NAN);
        for (int r = 0; r < rows; ++r)
            for (int t = 0; t < c.n; ++t) {
                float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                for (std::size_t p = 0; p < 2 * c.bytes; ++p)
                    s[p % 4] += tables[r * table_stride + p * 16 +
                                       ((codes[t * c.stride + p / 2] >> (4 * (p % 2))) & 15)];
                expected[r * sum_stride + t] = (s[0] + s[1]) + (s[2] + s[3]);
            }
        for (const std::string& isa : cpu_isas()) {
            use_cpu_isa(isa);
            std::vector<float> sums(rows * sum_stride, NAN);
            nibble_table_sums(tables.data(), table_stride, rows, codes.data(), c.stride, c.bytes,
                              c.n, sums.data(), sum_stride);
            for (int r = 0; r < rows; ++r)
                for (int t = 0; t < c.n; ++t)
                    ASSERT_EQ(sums[r * sum_stride + t], expected[r * sum_stride + t])
                        << isa << " bytes " << c.bytes << " stride " << c.stride << " n " << c.n
                        << " row " << r << " token " << t;
        }
    }
    use_cpu_isa(start);
}

TEST(CpuIsa, ByteTableSumsMatchTheScalarOrderOnEverySet) {
    std::mt19937 gen(13);
    std::normal_distribution<float> normal;
    const std::string start = cpu_isa_name();
    for (const TableSumCase& c : table_sum_cases()) {
        std::vector<float> tables(c.bytes * 256);
        for (auto& x : tables) x = normal(gen);
        std::vector<uint8_t> codes(c.n * c.stride);
        for (auto& b : codes) b = static_cast<uint8_t>(gen());
        for (const int chains : {1, 4}) {
            std::vector<float> expected(c.n);
            for (int t = 0; t < c.n; ++t) {
                float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                const std::size_t whole = chains == 4 ? c.bytes / 4 * 4 : 0;
                for (std::size_t b = 0; b < c.bytes; ++b)
                    s[b < whole ? b % 4 : 0] += tables[b * 256 + codes[t * c.stride + b]];
                expected[t] = chains == 4 ? (s[0] + s[1]) + (s[2] + s[3]) : s[0];
            }
            for (const std::string& isa : cpu_isas()) {
                use_cpu_isa(isa);
                std::vector<float> sums(c.n, NAN);
                byte_table_sums(tables.data(), codes.data(), c.stride, c.bytes, c.n, chains,
                                sums.data());
                for (int t = 0; t < c.n; ++t)
                    ASSERT_EQ(sums[t], expected[t])
                        << isa << " chains " << chains << " bytes " << c.bytes << " stride "
                        << c.stride << " n " << c.n << " token " << t;
            }
        }
    }
    use_cpu_isa(start);
    EXPECT_THROW(byte_table_sums(nullptr, nullptr, 1, 1, 0, 2, nullptr), std::invalid_argument);
}

// online_softmax_block_isa on every set against double precision: masked (-inf) logits among
// the others, a running max below, above and at -inf (first block), block sizes around the
// vector widths. Weights, m, l and the returned rescale factor.
TEST(CpuIsa, OnlineSoftmaxBlockMatchesDoublePrecisionOnEverySet) {
    std::mt19937 gen(14);
    std::normal_distribution<float> normal(0.0f, 4.0f);
    const std::string start = cpu_isa_name();
    for (const int n : {1, 3, 16, 17, 64, 100})
        for (const float m0 : {-INFINITY, -30.0f, 30.0f}) {
            std::vector<float> logits(n);
            for (int t = 0; t < n; ++t) logits[t] = t % 5 == 2 ? -INFINITY : normal(gen);
            const float l0 = m0 == -INFINITY ? 0.0f : 2.5f;
            double mx = m0;
            for (const float x : logits) mx = std::max(mx, static_cast<double>(x));
            double l_ref = m0 == -INFINITY ? 0.0 : l0 * std::exp(m0 - mx);
            std::vector<double> w_ref(n);
            // exp of the float difference, which the softmax rounds before its exp.
            for (int t = 0; t < n; ++t)
                l_ref += w_ref[t] =
                    std::exp(static_cast<double>(logits[t] - static_cast<float>(mx)));
            for (const std::string& isa : cpu_isas()) {
                use_cpu_isa(isa);
                float m = m0, l = l0;
                std::vector<float> w(n, NAN);
                const float rescale = online_softmax_block_isa(logits.data(), n, m, l, w.data());
                const std::string where =
                    isa + " n " + std::to_string(n) + " m0 " + std::to_string(m0);
                EXPECT_EQ(m, static_cast<float>(mx)) << where;
                EXPECT_NEAR(l, l_ref, 1e-6 * l_ref) << where;
                EXPECT_NEAR(rescale, m0 == -INFINITY ? 0.0 : std::exp(m0 - mx), 1e-6) << where;
                for (int t = 0; t < n; ++t)
                    ASSERT_NEAR(w[t], w_ref[t], 1e-6 * w_ref[t] + 1e-30) << where << " t " << t;
            }
        }
    use_cpu_isa(start);
}
