// ValueCodec: values of one KV head. value_bits = 16 stores fp16; otherwise v is rotated,
// each coordinate of the unit vector Rv/||v|| is Lloyd-Max quantized (rotated-coordinate law)
// and one float scale per token is stored. Attention accumulates sum_t p_t * v_t in the rotated
// domain and rotates back once (finalize).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/lloyd_max.h"
#include "core/rotation.h"

namespace veloxquant {

class ValueCodec {
public:
    /// bits in 1..8 or 16; seed already derived for (layer, head).
    ValueCodec(int dim, int bits, bool use_hadamard, uint64_t seed);

    int dim() const { return dim_; }
    int bits() const { return bits_; }
    std::size_t code_bytes() const;
    int num_scalars() const { return bits_ == 16 ? 0 : 1; }

    void encode(const float* values, int n, uint8_t* codes, float* scalars,
                std::size_t scalar_stride) const;
    void decode(const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                float* values) const;

    /// For each of `rows` query rows r: acc[r][0..dim) += sum_t weights[r * weight_stride + t] *
    /// (value t in the codec's domain). Each token is unpacked once and shared by all rows (the
    /// query heads of a GQA group and the queries of a prefill chunk).
    void accumulate(const float* weights, std::size_t weight_stride, int rows, const uint8_t* codes,
                    const float* scalars, int n, float* const* acc) const;
    /// Maps an accumulator back to the value space: out = R^T acc (a copy for fp16).
    void finalize(const float* acc, float* out) const;

    std::size_t parameter_bytes() const;
    /// Throws std::runtime_error when one of n codes, read from a file, is one encode() cannot
    /// produce: an infinity or NaN among fp16 values (every packed index is a centroid).
    void check_codes(const uint8_t* codes, int n) const;

    const Rotation& rotation() const { return rotation_; }
    /// The Lloyd-Max codebook of the rotated coordinates (null for fp16).
    const ScalarCodebook* codebook() const { return codebook_; }

private:
    int dim_;
    int bits_;
    Rotation rotation_;
    const ScalarCodebook* codebook_ = nullptr;
    /// For bits in {1, 2, 4, 8}: byte_lut_[b * (8 / bits) + k] is the centroid of the k-th
    /// index packed in byte value b, so a whole byte's coordinates are one short vector FMA.
    std::vector<float> byte_lut_;
};

}  // namespace veloxquant
