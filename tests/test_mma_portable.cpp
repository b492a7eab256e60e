// The portable mma and ldmatrix (src/cuda/mma_portable.h), which the generic attention takes on
// GPUs without those instructions, run here lane by lane on the host. The references are the PTX
// ISA's fragment layouts, written out independently below: the mma against a double-precision
// matrix product, the ldmatrix against the mma fragments it must deliver with the addresses the
// kernels give it (codec_feature_scores.cuh: the tile as A; codec_value_mma.cuh: its transpose).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/half.h"
#include "cuda/mma_portable.h"

namespace veloxquant::cuda {
namespace {

using Fragments = std::vector<std::array<uint32_t, 4>>;  // [32 lanes][4 registers]

/// Halves of a random normal matrix (rows x cols, row-major).
std::vector<uint16_t> random_halves(int rows, int cols, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<uint16_t> h(static_cast<size_t>(rows) * cols);
    for (auto& x : h) x = float_to_half(normal(rng));
    return h;
}

void put_half(uint32_t& word, int upper, uint16_t h) {
    word |= static_cast<uint32_t>(h) << (16 * upper);
}

/// The A fragment (16 x 16, row-major source m[row * ld + k]): element (row, k) lives in lane
/// 4 (row % 8) + (k % 8) / 2, register (row / 8) + 2 (k / 8), half k % 2 (PTX ISA).
Fragments a_fragments(const uint16_t* m, int ld) {
    Fragments f(32, std::array<uint32_t, 4>{});
    for (int row = 0; row < 16; ++row)
        for (int k = 0; k < 16; ++k)
            put_half(f[4 * (row % 8) + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2, m[row * ld + k]);
    return f;
}

TEST(MmaPortable, MatchesTheMatrixProduct) {
    for (uint32_t seed : {1u, 2u, 3u}) {
        const auto A = random_halves(16, 16, seed), B = random_halves(16, 8, seed + 10);
        std::mt19937 rng(seed + 20);
        std::normal_distribution<float> normal(0.0f, 4.0f);
        float C[16][8];
        for (auto& row : C)
            for (float& x : row) x = normal(rng);
        const Fragments a = a_fragments(A.data(), 16);
        // B (16 x 8, element (k, n) at B[k * 8 + n]): lane 4 n + (k % 8) / 2, register k / 8.
        std::vector<std::array<uint32_t, 2>> b(32, std::array<uint32_t, 2>{});
        for (int k = 0; k < 16; ++k)
            for (int n = 0; n < 8; ++n)
                put_half(b[4 * n + (k % 8) / 2][k / 8], k % 2, B[k * 8 + n]);
        double worst = 0.0, scale = 0.0;
        for (int lane = 0; lane < 32; ++lane) {
            // C: element (row, n) in lane 4 (row % 8) + n / 2, accumulator 2 (row / 8) + n % 2.
            const int g = lane / 4, n = 2 * (lane % 4);
            float c[4] = {C[g][n], C[g][n + 1], C[g + 8][n], C[g + 8][n + 1]};
            mma_16816_by_lanes(c, lane,
                               [&](int r, int j) { return r < 4 ? a[j][r] : b[j][r - 4]; });
            for (int i = 0; i < 4; ++i) {
                const int row = g + 8 * (i / 2), col = n + i % 2;
                double want = C[row][col];
                for (int k = 0; k < 16; ++k)
                    want += static_cast<double>(half_to_float(A[row * 16 + k])) *
                            half_to_float(B[k * 8 + col]);
                worst = std::max(worst, std::abs(c[i] - want));
                scale = std::max(scale, std::abs(want));
            }
        }
        EXPECT_LE(worst, 1e-6 * scale) << "seed " << seed;
    }
}

TEST(MmaPortable, LdmatrixDeliversTheKernelsFragments) {
    const int stride = 24;  // halves a row: an odd multiple of 8, as the kernels' tiles
    const auto tile = random_halves(16, stride, 7);
    // Scores (codec_feature_scores.cuh): the tile itself (16 tokens x 16 features) is A.
    Fragments got(32, std::array<uint32_t, 4>{});
    for (int lane = 0; lane < 32; ++lane) {
        uint32_t r[4];
        ldmatrix_x4_by_lanes<false>(r, lane, [&](int j) {
            return tile.data() + ((j & 7) + ((j >> 3) & 1) * 8) * stride + (j >> 4) * 8;
        });
        std::copy(r, r + 4, got[lane].begin());
    }
    EXPECT_EQ(got, a_fragments(tile.data(), stride));
    // Values (codec_value_mma.cuh): A is the transpose (coordinates x tokens), through .trans.
    std::vector<uint16_t> transposed(16 * 16);
    for (int t = 0; t < 16; ++t)
        for (int j = 0; j < 16; ++j) transposed[j * 16 + t] = tile[t * stride + j];
    for (int lane = 0; lane < 32; ++lane) {
        uint32_t r[4];
        ldmatrix_x4_by_lanes<true>(r, lane, [&](int j) {
            return tile.data() + ((j & 7) + ((j >> 4) << 3)) * stride + ((j >> 3) & 1) * 8;
        });
        std::copy(r, r + 4, got[lane].begin());
    }
    EXPECT_EQ(got, a_fragments(transposed.data(), 16));
}

}  // namespace
}  // namespace veloxquant::cuda
