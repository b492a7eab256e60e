#include "attention/online_softmax.h"

namespace veloxquant {
namespace {

using FoldFn = float (*)(const float*, int, float&, float&, float*);

float fold_generic(const float* logits, int n, float& m, float& l, float* weights) {
    return online_softmax_block(logits, n, m, l, weights);
}

#ifdef VQ_X86_KERNELS
VQ_TARGET_AVX2 float fold_avx2(const float* logits, int n, float& m, float& l, float* weights) {
    return online_softmax_block(logits, n, m, l, weights);
}

VQ_TARGET_AVX512 float fold_avx512(const float* logits, int n, float& m, float& l, float* weights) {
    return online_softmax_block(logits, n, m, l, weights);
}
#endif

}  // namespace

float online_softmax_block_isa(const float* logits, int n, float& m, float& l, float* weights) {
    const FoldFn fold = VQ_KERNEL_FOR_ISA(fold_generic, fold_avx2, fold_avx512);
    return fold(logits, n, m, l, weights);
}

}  // namespace veloxquant
