// Online softmax state (FlashAttention / flash-decoding): running max m, denominator l and an
// unnormalised accumulator; partial states over disjoint token sets merge exactly.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace veloxquant {

/// exp(x) for x <= 0 to about 2 ulp, in branch-free arithmetic that vectorizes (std::exp does
/// not without -ffast-math): x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-6 polynomial,
/// 2^n assembled in the exponent bits. Inputs below -87 give 0.
inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = static_cast<float>(static_cast<int>(x * 1.44269504088896341f - 0.5f));
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return x <= -87.0f ? 0.0f : p * scale;
}

/// Folds a block of logits into (m, l) and returns the factor by which the old accumulator must
/// be multiplied; writes the block's unnormalised weights exp(s - m_new) to weights (masked
/// logits are -inf and get weight 0).
inline float online_softmax_block(const float* logits, int n, float& m, float& l, float* weights) {
    float block_max = -std::numeric_limits<float>::infinity();
    for (int t = 0; t < n; ++t) block_max = logits[t] > block_max ? logits[t] : block_max;
    if (block_max == -std::numeric_limits<float>::infinity()) {
        for (int t = 0; t < n; ++t) weights[t] = 0.0f;
        return 1.0f;
    }
    float rescale = 1.0f;
    if (block_max > m) {
        rescale = m == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(m - block_max);
        l *= rescale;
        m = block_max;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < n; ++t) {
        weights[t] = exp_nonpositive(logits[t] - m);
        sum += weights[t];
    }
    l += sum;
    return rescale;
}

}  // namespace veloxquant
