// Keys with a strong pre-RoPE mean, turned by RoPE in double on either pairing: the inputs of
// the center_keys tests on the CPU (test_centered_keys.cpp) and the device
// (cuda/test_cuda_center_keys.cpp).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "test_helpers.h"

namespace vqtest {

// theta_i = 10000^(-2i / d), as a Llama model's RoPE.
inline std::vector<double> rope_freqs(int d) {
    std::vector<double> f(d / 2);
    for (int i = 0; i < d / 2; ++i) f[i] = std::pow(10000.0, -2.0 * i / d);
    return f;
}

// x turned by RoPE at position pos, in double: pairs (2i, 2i + 1), or (i, i + P) half split
// (transformers' rotate_half: x * cos + rotate_half(x) * sin), P = freqs.size().
inline std::vector<double> turned(const std::vector<double>& x, const std::vector<double>& freqs,
                                  double pos, bool half_split = false) {
    std::vector<double> y = x;
    const std::size_t P = freqs.size();
    for (std::size_t i = 0; i < P; ++i) {
        const double c = std::cos(pos * freqs[i]), s = std::sin(pos * freqs[i]);
        const std::size_t a = half_split ? i : 2 * i, b = half_split ? i + P : 2 * i + 1;
        y[a] = x[a] * c - x[b] * s;
        y[b] = x[a] * s + x[b] * c;
    }
    return y;
}

// Keys [heads][n][d] = RoPE_t(mean_scale mu_h + noise), the noise N(0, 1), mu_h N(0, 1) on the
// slowly turning half of the pairs and zero on the rest: a strong pre-RoPE mean per head where
// a RoPE model's keys have theirs.
inline std::vector<float> rope_keys(int heads, int n, int d, const std::vector<double>& freqs,
                                    uint64_t seed, double mean_scale = 3.0,
                                    bool half_split = false) {
    const std::vector<float> means = randn(static_cast<std::size_t>(heads) * d, seed, 1.0f);
    const std::vector<float> noise = randn(static_cast<std::size_t>(heads) * n * d, seed + 1);
    std::vector<float> keys(noise.size());
    const int P = static_cast<int>(freqs.size());
    auto slow = [&](int j) { return half_split ? j % P >= P / 2 : j >= d / 2; };
    for (int h = 0; h < heads; ++h)
        for (int t = 0; t < n; ++t) {
            std::vector<double> x(d);
            for (int j = 0; j < d; ++j)
                x[j] = (slow(j) ? mean_scale * means[h * d + j] : 0.0) +
                       noise[(static_cast<std::size_t>(h) * n + t) * d + j];
            const std::vector<double> y = turned(x, freqs, t, half_split);
            for (int j = 0; j < d; ++j)
                keys[(static_cast<std::size_t>(h) * n + t) * d + j] = static_cast<float>(y[j]);
        }
    return keys;
}

}  // namespace vqtest
