// Online softmax state (FlashAttention / flash-decoding): running max m, denominator l and an
// unnormalised accumulator; partial states over disjoint token sets merge exactly.
#pragma once

#include <cmath>
#include <limits>

namespace veloxquant {

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
    for (int t = 0; t < n; ++t) {
        weights[t] = std::exp(logits[t] - m);
        sum += weights[t];
    }
    l += sum;
    return rescale;
}

}  // namespace veloxquant
