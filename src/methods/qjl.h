// QJL key codec (Zandieh et al., "QJL: 1-Bit Quantized JL Transform for KV Cache Quantization",
// arXiv 2406.03482): m sign bits of a Gaussian sketch of the key plus its norm, scored with the
// paper's unbiased asymmetric estimator (the query is sketched but not quantized).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "methods/key_codec.h"

namespace veloxquant {

/// Per token: code = the m bits sign(S k) packed LSB-first (bit i = 1 iff (S k)_i >= 0; bits past
/// m in the last byte are 0); scalar 0 = ||k|| (float32).
/// Score: sqrt(pi/2)/m * ||k|| * <S q, sign(S k)>, unbiased over the draw of S (the
/// paper's asymmetric estimator).
/// decode returns the matching reconstruction ||k|| sqrt(pi/2)/m * S^T sign(S k), so that
/// score == <q, decode(k)>.
class QJLCodec : public KeyCodec {
public:
    static constexpr int kMaxSketchDim = 8192;
    static constexpr int kMinDim = 2;
    static constexpr int kMaxDim = 1024;

    /// S in R^{sketch_dim x d}, entries i.i.d. N(0, 1) drawn row-major from Rng(seed).normal().
    /// Throws std::invalid_argument unless 1 <= sketch_dim <= 8192 and 2 <= d <= 1024.
    QJLCodec(int d, int sketch_dim, uint64_t seed);

    int sketch_dim() const { return m_; }
    /// Row-major m x d sketch.
    const std::vector<float>& sketch() const { return sketch_; }

    std::size_t code_bytes() const override;
    int num_scalars() const override { return 1; }

    void encode(const float* keys, int n, uint8_t* codes, float* scalars,
                std::size_t scalar_stride) const override;
    void decode(const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                float* keys) const override;

    /// State: the tables' kind, then per code nibble (where nibble_table_sums has a SIMD build)
    /// or per code byte a table LUT[part][bits] = sqrt(pi/2)/m * sum over the part's sketch
    /// rows i of +-(S q)_i, + where the bit of row i is set.
    std::size_t query_state_size() const override;
    void prepare_query(const float* query, float* state) const override;
    void score(const float* state, const uint8_t* codes, const float* scalars,
               std::size_t scalar_stride, int n, float* scores) const override;
    /// Rows whose states all hold nibble tables are scored together (nibble_table_sums).
    void score_rows_at(const float* states, std::size_t state_stride, int rows,
                       const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                       int pos0, float* scores, std::size_t score_stride) const override;

    std::size_t parameter_bytes() const override;

private:
    int m_;
    std::vector<float> sketch_;  ///< m x d, row-major
};

}  // namespace veloxquant
