// Online softmax state (FlashAttention / flash-decoding): running max m, denominator l and an
// unnormalised accumulator; partial states over disjoint token sets merge exactly.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

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

/// exp(x) for x <= 0 (-inf included) through exp_from_minus88, x clamped at -88.
inline float exp_nonpositive(float x) {
    return exp_from_minus88(x < -88.0f ? -88.0f : x);
}

/// Folds a block of logits into (m, l) and returns the factor by which the old accumulator must
/// be multiplied; writes the block's unnormalised weights exp(s - m_new) to weights (masked
/// logits are -inf and get weight 0). Its loops are compiled for each CPU kernel set
/// (core/cpu_isa.h; online_softmax.cpp).
float online_softmax_block(const float* logits, int n, float& m, float& l, float* weights);

}  // namespace veloxquant
