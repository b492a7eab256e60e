#include "methods/fp16_codec.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "core/half.h"

namespace veloxquant {

FP16Codec::FP16Codec(int d) : KeyCodec(d) {
    if (d < 1 || d > 1024)
        throw std::invalid_argument("fp16: head_dim must be in 1..1024, got " + std::to_string(d));
}

void FP16Codec::encode(const float* keys, int n, uint8_t* codes, float*, std::size_t) const {
    const int d = dim();
    for (int t = 0; t < n; ++t) {
        uint16_t* out =
            reinterpret_cast<uint16_t*>(codes + static_cast<std::size_t>(t) * code_bytes());
        for (int j = 0; j < d; ++j)
            out[j] = float_to_half(keys[static_cast<std::size_t>(t) * d + j]);
    }
}

void FP16Codec::decode(const uint8_t* codes, const float*, std::size_t, int n, float* keys) const {
    const int d = dim();
    const float* table = half_table();
    for (int t = 0; t < n; ++t) {
        const uint16_t* in =
            reinterpret_cast<const uint16_t*>(codes + static_cast<std::size_t>(t) * code_bytes());
        for (int j = 0; j < d; ++j) keys[static_cast<std::size_t>(t) * d + j] = table[in[j]];
    }
}

void FP16Codec::prepare_query(const float* query, float* state) const {
    std::memcpy(state, query, sizeof(float) * dim());
}

void FP16Codec::score(const float* state, const uint8_t* codes, const float*, std::size_t, int n,
                      float* scores) const {
    const int d = dim();
    const float* table = half_table();
    for (int t = 0; t < n; ++t) {
        const uint16_t* in =
            reinterpret_cast<const uint16_t*>(codes + static_cast<std::size_t>(t) * code_bytes());
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < d; ++j) s += state[j] * table[in[j]];
        scores[t] = s;
    }
}

}  // namespace veloxquant
