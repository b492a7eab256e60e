// Online softmax state (FlashAttention / flash-decoding): running max m, denominator l and an
// unnormalised accumulator; partial states over disjoint token sets merge exactly.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "core/cpu_isa.h"

namespace veloxquant {

/// exp(x) for -88 <= x <= 0 to about 2 ulp, in branch-free arithmetic that vectorizes (std::exp
/// does not without -ffast-math): x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-6
/// polynomial, 2^n assembled in the exponent bits. Below about -87.68 (e^x < 2^-126.5), n is
/// -127, 2^n's exponent bits are 0 and the result is exactly 0.
inline float exp_from_minus88(float x) {
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
    return p * scale;
}

/// exp(x) for x <= 0 (-inf included) through exp_from_minus88, x clamped at -88 (a NaN too).
inline float exp_nonpositive(float x) {
    return exp_from_minus88(x > -88.0f ? x : -88.0f);
}

/// Folds a block of logits into (m, l) and returns the factor by which the old accumulator must
/// be multiplied; writes the block's unnormalised weights exp(s - m_new) to weights (masked
/// logits are -inf and get weight 0). Always inlined, so that its loops take the caller's
/// vectors: the dense reference's baseline ones, or a kernel set's (online_softmax_block_isa).
VQ_ALWAYS_INLINE float online_softmax_block(const float* logits, int n, float& m, float& l,
                                            float* weights) {
    float block_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : block_max)
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
    // Clamped in a loop of its own: with the clamp inside, GCC turns it into a branch (the
    // clamped path folds to a constant), and the exp loop no longer vectorizes. m is read into
    // a local, as through the reference it could alias weights.
    // The clamp also takes a NaN (scores overflowed by extreme but finite codec parameters, or
    // inf - inf) to -88, weight 0: exp_from_minus88 must not convert a NaN to an integer.
    const float max = m;
    for (int t = 0; t < n; ++t) {
        const float x = logits[t] - max;
        weights[t] = x > -88.0f ? x : -88.0f;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < n; ++t) {
        weights[t] = exp_from_minus88(weights[t]);
        sum += weights[t];
    }
    l += sum;
    return rescale;
}

/// online_softmax_block compiled for the CPU kernel set in use (core/cpu_isa.h), for the paged
/// decode, whose scorers and value sums run that set too. The dense reference keeps the inline
/// baseline build: there, AVX-512 softmax blocks between its baseline loops slowed it by 15%.
float online_softmax_block_isa(const float* logits, int n, float& m, float& l, float* weights);

}  // namespace veloxquant
