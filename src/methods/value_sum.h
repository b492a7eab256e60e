// The value sum of attention on packed 1-, 2- and 4-bit value codes (ValueCodec::accumulate's
// fast path on AVX2 and AVX-512): acc[r][j] += sum_t w[r][t] * scale_t * centroid[code_t[j]].
#pragma once

#include <cstddef>
#include <cstdint>

namespace veloxquant {

/// ValueCodec::accumulate's inputs: rows of weights (weights[r * weight_stride + t]), the n
/// tokens' codes (code_bytes each, LSB-first bit-packed indices) and scales, and the codebook.
struct ValueSumArgs {
    const float* weights;
    std::size_t weight_stride;
    int rows;
    const uint8_t* codes;
    std::size_t code_bytes;
    const float* scalars;
    int n;
    float* const* acc;
    int dim, bits;
    const float* centroids;
};

/// Adds the rows' weighted sums of the tokens' values to acc on the CPU set in use (a token whose
/// weight is zero in each of a group of rows is skipped there) and returns true; returns false,
/// touching nothing,
/// where it has no kernel (generic set, bits not 1, 2 or 4, dim not a multiple of the vector
/// width: 16 floats on AVX-512, 8 on AVX2).
bool sum_packed_values(const ValueSumArgs& a);

}  // namespace veloxquant
