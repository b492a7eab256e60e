#include "attention/online_softmax.h"

#include "core/cpu_isa.h"

namespace veloxquant {
namespace {

// The body of online_softmax_block, inlined into each set's entry point so that its loops take
// that set's vectors (the exp loop is most of the softmax's time).
VQ_ALWAYS_INLINE float fold_block(const float* logits, int n, float& m, float& l, float* weights) {
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
    const float max = m;
    for (int t = 0; t < n; ++t) {
        const float x = logits[t] - max;
        weights[t] = x < -88.0f ? -88.0f : x;
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

using FoldFn = float (*)(const float*, int, float&, float&, float*);

float fold_generic(const float* logits, int n, float& m, float& l, float* weights) {
    return fold_block(logits, n, m, l, weights);
}

#ifdef VQ_X86_KERNELS
VQ_TARGET_AVX2 float fold_avx2(const float* logits, int n, float& m, float& l, float* weights) {
    return fold_block(logits, n, m, l, weights);
}

VQ_TARGET_AVX512 float fold_avx512(const float* logits, int n, float& m, float& l, float* weights) {
    return fold_block(logits, n, m, l, weights);
}
#endif

}  // namespace

float online_softmax_block(const float* logits, int n, float& m, float& l, float* weights) {
#ifdef VQ_X86_KERNELS
    const FoldFn fold = kernel_for_isa(fold_generic, fold_avx2, fold_avx512);
#else
    const FoldFn fold = fold_generic;
#endif
    return fold(logits, n, m, l, weights);
}

}  // namespace veloxquant
