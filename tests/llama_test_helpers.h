// Helpers of the Llama tests (test_llama.cpp, test_llama_matmul.cpp): the test's own GGML
// quantizers (ggml-common.h layouts: the bytes for a file and the values they decode to, for
// the references), random matrices, the largest relative difference and exception checks.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/half.h"
#include "model/gguf.h"

namespace llamatest {

using namespace veloxquant;

using Matrix = std::vector<float>;  // row-major [rows][cols]

// ---- Test-side quantizers (ggml-common.h layouts): bytes for the file, and the exact values
// they decode to, for the reference.

struct Quantized {
    GGMLType type;
    std::vector<uint8_t> bytes;
    Matrix values;  // what the bytes decode to
};

inline void put_half(std::vector<uint8_t>& out, float v) {
    const uint16_t h = float_to_half(v);
    out.push_back(static_cast<uint8_t>(h & 0xFF));
    out.push_back(static_cast<uint8_t>(h >> 8));
}

inline Quantized quantize(GGMLType type, const Matrix& x) {
    Quantized q{type, {}, Matrix(x.size())};
    if (type == GGMLType::F32) {
        q.bytes.resize(x.size() * 4);
        std::memcpy(q.bytes.data(), x.data(), q.bytes.size());
        q.values = x;
        return q;
    }
    if (type == GGMLType::F16) {
        for (std::size_t i = 0; i < x.size(); ++i) {
            put_half(q.bytes, x[i]);
            q.values[i] = half_to_float(float_to_half(x[i]));
        }
        return q;
    }
    for (std::size_t b = 0; b < x.size(); b += 32) {
        const float* v = &x[b];
        float* out = &q.values[b];
        if (type == GGMLType::Q8_0) {  // x = q * d, q in [-127, 127]
            float amax = 0.0f;
            for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
            const float d = half_to_float(float_to_half(amax / 127.0f));
            put_half(q.bytes, d);
            for (int j = 0; j < 32; ++j) {
                const int qi = d > 0 ? static_cast<int>(std::lround(v[j] / d)) : 0;
                const int c = std::clamp(qi, -127, 127);
                q.bytes.push_back(static_cast<uint8_t>(static_cast<int8_t>(c)));
                out[j] = static_cast<float>(c) * d;
            }
        } else {  // Q4_1: x = q * d + m, q in [0, 15]; byte j = element j | element j + 16 << 4
            const float lo = *std::min_element(v, v + 32), hi = *std::max_element(v, v + 32);
            const float d = half_to_float(float_to_half((hi - lo) / 15.0f));
            const float m = half_to_float(float_to_half(lo));
            put_half(q.bytes, d);
            put_half(q.bytes, m);
            int qs[32];
            for (int j = 0; j < 32; ++j) {
                const int qi = d > 0 ? static_cast<int>(std::lround((v[j] - m) / d)) : 0;
                qs[j] = std::clamp(qi, 0, 15);
                out[j] = static_cast<float>(qs[j]) * d + m;
            }
            for (int j = 0; j < 16; ++j)
                q.bytes.push_back(static_cast<uint8_t>(qs[j] | qs[j + 16] << 4));
        }
    }
    return q;
}

inline Matrix randn(std::size_t n, std::mt19937& gen, float scale, float mean = 0.0f) {
    std::normal_distribution<float> dist(mean, scale);
    Matrix v(n);
    for (auto& x : v) x = dist(gen);
    return v;
}

// max |a - b| / max |b|.
inline double max_rel(const std::vector<float>& a, const std::vector<float>& b) {
    double diff = 0.0, scale = 0.0;
    for (std::size_t i = 0; i < b.size(); ++i) {
        diff = std::max(diff, std::fabs(static_cast<double>(a[i]) - b[i]));
        scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
    }
    return diff / scale;
}

template <typename E>
void expect_error(const std::function<void()>& f, const std::string& needle) {
    try {
        f();
        ADD_FAILURE() << "no exception; expected one mentioning '" << needle << "'";
    } catch (const E& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
}

}  // namespace llamatest
