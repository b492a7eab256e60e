// VQ_HD marks a function that compiles for the host (g++) and, under nvcc, for CUDA threads too:
// the core helpers the device codecs share with the CPU code (one definition for both).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define VQ_HD __host__ __device__ inline
#else
#define VQ_HD inline
#endif

/// x / d correctly rounded, from r = 1 / d correctly rounded: q = x r, then one correction with
/// the residual x - q d, exact under a fused multiply-add (Markstein's theorem: q is within an
/// ulp of x / d and r within half an ulp of 1 / d, so RN(q + (x - q d) r) = RN(x / d)). Holds
/// wherever the quotient is a normal float; one reciprocal then serves a vector's divisions.
VQ_HD float divide_by_reciprocal(float x, float d, float r) {
#if defined(__CUDA_ARCH__)
    const float q = __fmul_rn(x, r);
    return __fmaf_rn(__fmaf_rn(-q, d, x), r, q);
#else
    const float q = x * r;
    return std::fma(std::fma(-q, d, x), r, q);
#endif
}
