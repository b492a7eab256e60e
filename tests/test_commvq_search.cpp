// commvq's nearest-codeword search: commvq_nearest (every codeword's value) and
// commvq_nearest_bounded (fused multiply-adds first, the codec's values only near the least)
// against this file's reference: the codec's value of each codeword in float, products rounded
// before their adds, coordinates in order, the first index of the least (NaNs skipped, the last
// index where all are NaN). Under every CPU kernel set, on random codebooks and on the cases a
// bound gets wrong first: exact and one-ulp ties, codewords a few ulps apart that the fused
// values rank otherwise, values that underflow, values near the
// bound's overflow guard, NaN and Inf queries, codeword counts that leave vector tails.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/cpu_isa.h"
#include "methods/commvq.h"

namespace veloxquant {
namespace {

struct Book {
    int n = 0, dim = 0;
    std::vector<float> words_t, norms2, bound;  // [dim][n], [n], [1 + dim]
};

// Codewords [n][dim] -> the search's layout; norms2 in double rounded once, as the codec's.
Book make_book(const std::vector<float>& words, int n, int dim) {
    Book b;
    b.n = n;
    b.dim = dim;
    b.words_t.resize(words.size());
    commvq_transpose(words.data(), n, dim, b.words_t.data());
    b.norms2.resize(n);
    for (int c = 0; c < n; ++c) {
        double s = 0.0;
        for (int j = 0; j < dim; ++j)
            s += static_cast<double>(words[c * dim + j]) * words[c * dim + j];
        b.norms2[c] = static_cast<float>(s);
    }
    b.bound.resize(1 + dim);
    commvq_search_bound(b.words_t.data(), b.norms2.data(), n, dim, b.bound.data());
    return b;
}

int reference_nearest(const Book& b, const float* x) {
    float m = std::numeric_limits<float>::infinity();
    int best = -1;
    for (int c = 0; c < b.n; ++c) {
        float v = b.norms2[c];
        for (int j = 0; j < b.dim; ++j) {
            const float product = -2.0f * x[j] * b.words_t[static_cast<std::size_t>(j) * b.n + c];
            v = v + product;
        }
        if (v < m || (best < 0 && v == m)) {
            m = v;
            best = c;
        }
    }
    return best < 0 ? b.n - 1 : best;
}

// Both searches against the reference under every kernel set this CPU runs.
void expect_same(const Book& b, const float* x, const std::string& what) {
    const int want = reference_nearest(b, x);
    const std::string start = cpu_isa_name();
    for (const std::string& isa : cpu_isas()) {
        use_cpu_isa(isa);
        EXPECT_EQ(commvq_nearest(x, b.words_t.data(), b.norms2.data(), b.n, b.dim), want)
            << what << " " << isa;
        EXPECT_EQ(commvq_nearest_bounded(x, b.words_t.data(), b.norms2.data(), b.bound.data(), b.n,
                                         b.dim),
                  want)
            << what << " " << isa;
    }
    use_cpu_isa(start);
}

std::vector<float> normal(std::mt19937& gen, std::size_t n, float scale) {
    std::normal_distribution<float> dist(0.0f, 1.0f);
    std::vector<float> v(n);
    for (auto& x : v) x = scale * dist(gen);
    return v;
}

TEST(CommVQSearch, BoundedSearchMatchesTheReferenceOnRandomCodebooks) {
    std::mt19937 gen(5);
    for (const int n : {256, 64, 40, 2})
        for (const int dim : {2, 4, 8, 16})
            for (const float scale : {1.0f, 1e-3f, 30.0f}) {
                const Book b =
                    make_book(normal(gen, static_cast<std::size_t>(n) * dim, scale), n, dim);
                for (int k = 0; k < 200; ++k) {
                    // Queries near a codeword (the usual case: one codeword well ahead) and far.
                    std::vector<float> x = normal(gen, dim, k % 2 ? scale : 0.05f * scale);
                    if (k % 2 == 0)
                        for (int j = 0; j < dim; ++j)
                            x[j] += b.words_t[static_cast<std::size_t>(j) * n + k % n];
                    expect_same(b, x.data(),
                                "n " + std::to_string(n) + " dim " + std::to_string(dim) +
                                    " scale " + std::to_string(scale) + " query " +
                                    std::to_string(k));
                }
            }
}

TEST(CommVQSearch, TiesGoToTheFirstIndexAsInTheReference) {
    std::mt19937 gen(9);
    const int n = 96, dim = 8;
    std::vector<float> words = normal(gen, static_cast<std::size_t>(n) * dim, 1.0f);
    // Codeword 70 repeats 10 (an exact tie), 71 is 11 moved by one ulp in one coordinate, 72-79
    // are 12 with its coordinates permuted pairwise (the same norm, other products).
    for (int j = 0; j < dim; ++j) {
        words[70 * dim + j] = words[10 * dim + j];
        words[71 * dim + j] = words[11 * dim + j];
    }
    words[71 * dim + 3] = std::nextafter(words[71 * dim + 3], 2.0f);
    for (int c = 72; c < 80; ++c)
        for (int j = 0; j < dim; ++j) words[c * dim + j] = words[12 * dim + (j ^ (c & 7))];
    const Book b = make_book(words, n, dim);
    for (const int target : {10, 11, 12, 70, 71, 75}) {
        std::vector<float> x(dim);
        for (int j = 0; j < dim; ++j) x[j] = words[target * dim + j];
        expect_same(b, x.data(), "on codeword " + std::to_string(target));
        for (int k = 0; k < 50; ++k) {  // slightly off it, so the tied pair's values move
            std::vector<float> y = x;
            const auto noise = normal(gen, dim, 1e-6f);
            for (int j = 0; j < dim; ++j) y[j] += noise[j];
            expect_same(b, y.data(), "near codeword " + std::to_string(target));
        }
    }
    // x = 0: every value is its norm; equal norms tie.
    expect_same(b, std::vector<float>(dim, 0.0f).data(), "zero query");
}

// The least value with every product fused into its add (what the bounded search ranks by
// first), its first index.
int fused_nearest(const Book& b, const float* x) {
    float m = std::numeric_limits<float>::infinity();
    int best = 0;
    for (int c = 0; c < b.n; ++c) {
        float v = b.norms2[c];
        for (int j = 0; j < b.dim; ++j)
            v = std::fma(-2.0f * x[j], b.words_t[static_cast<std::size_t>(j) * b.n + c], v);
        if (v < m) {
            m = v;
            best = c;
        }
    }
    return best;
}

// Codewords a few ulps apart, queries near them: the fused values rank them otherwise than the
// codec's often enough that the bounded search must look past the fused least to be right.
TEST(CommVQSearch, CodewordsUlpsApartWhereFusedValuesRankThemOtherwise) {
    std::mt19937 gen(17);
    std::uniform_int_distribution<int> ulps(-4, 4);
    const int n = 16, dim = 8;
    int flips = 0;
    for (int trial = 0; trial < 4000; ++trial) {
        std::vector<float> words = normal(gen, dim, 1.0f);
        words.resize(static_cast<std::size_t>(n) * dim);
        for (int c = 1; c < n; ++c)
            for (int j = 0; j < dim; ++j) {
                float w = words[j];
                for (int k = ulps(gen); k != 0; k += k > 0 ? -1 : 1)
                    w = std::nextafter(w, k > 0 ? 10.0f : -10.0f);
                words[c * dim + j] = w;
            }
        const Book b = make_book(words, n, dim);
        std::vector<float> x = normal(gen, dim, 1e-3f);
        for (int j = 0; j < dim; ++j) x[j] += words[j];
        if (fused_nearest(b, x.data()) == reference_nearest(b, x.data())) continue;
        ++flips;
        expect_same(b, x.data(), "trial " + std::to_string(trial));
    }
    EXPECT_GE(flips, 20);  // the cases this test is for did occur
}

TEST(CommVQSearch, TinyHugeAndNonFiniteQueriesMatchTheReference) {
    std::mt19937 gen(13);
    const int n = 256, dim = 8;
    for (const float scale : {1e-20f, 1e-38f, 1e9f, 3e18f}) {
        const Book b = make_book(normal(gen, static_cast<std::size_t>(n) * dim, scale), n, dim);
        for (int k = 0; k < 100; ++k) {
            std::vector<float> x = normal(gen, dim, scale);
            expect_same(b, x.data(),
                        "scale " + std::to_string(scale) + " query " + std::to_string(k));
        }
    }
    // A coordinate whose codewords are all zero: a huge x_j there makes -2 x_j infinite and
    // every value NaN (the last index), though its products add nothing to the bound.
    std::vector<float> zero_column = normal(gen, static_cast<std::size_t>(n) * dim, 1.0f);
    for (int c = 0; c < n; ++c) zero_column[c * dim + 2] = 0.0f;
    const Book z = make_book(zero_column, n, dim);
    for (const float huge : {3e38f, 1e30f}) {
        std::vector<float> x = normal(gen, dim, 1.0f);
        x[2] = huge;
        expect_same(z, x.data(), "huge query over a zero coordinate " + std::to_string(huge));
    }
    const Book b = make_book(normal(gen, static_cast<std::size_t>(n) * dim, 1.0f), n, dim);
    const float inf = std::numeric_limits<float>::infinity();
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), inf, -inf, 3e38f}) {
        std::vector<float> x = normal(gen, dim, 1.0f);
        x[5] = bad;
        expect_same(b, x.data(), "query holding " + std::to_string(bad));
    }
}

}  // namespace
}  // namespace veloxquant
