// FP16Codec: keys stored as IEEE fp16, the uncompressed baseline ("fp16" method) behind the same
// interface as every compressed method, so comparisons run the same code.
#pragma once

#include "methods/key_codec.h"

namespace veloxquant {

class FP16Codec : public KeyCodec {
public:
    explicit FP16Codec(int d);

    std::size_t code_bytes() const override { return 2u * static_cast<std::size_t>(dim()); }
    int num_scalars() const override { return 0; }
    void encode(const float* keys, int n, uint8_t* codes, float* scalars,
                std::size_t scalar_stride) const override;
    void decode(const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                float* keys) const override;
    std::size_t query_state_size() const override { return static_cast<std::size_t>(dim()); }
    void prepare_query(const float* query, float* state) const override;
    void score(const float* state, const uint8_t* codes, const float* scalars,
               std::size_t scalar_stride, int n, float* scores) const override;
    /// The rows share each token's conversion (AVX-512: 16 halves per vcvtph2ps, AVX2 + F16C: 8;
    /// the products summed in lanes, so the last bits differ from the baseline's table loop).
    void score_rows_at(const float* states, std::size_t state_stride, int rows,
                       const uint8_t* codes, const float* scalars, std::size_t scalar_stride, int n,
                       int pos0, float* scores, std::size_t score_stride) const override;
    std::size_t parameter_bytes() const override { return 0; }
    void check_codes(const uint8_t* codes, int n) const override;
};

}  // namespace veloxquant
