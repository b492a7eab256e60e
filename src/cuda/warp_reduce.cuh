// Warp-wide reductions shared by the CUDA kernels (every lane gets the result), and the
// Walsh-Hadamard transform of a vector spread over a warp.
#pragma once

#include <cuda_runtime.h>

namespace veloxquant::cuda {

constexpr unsigned kFull = 0xffffffffu;  // every lane of a warp, for the *_sync intrinsics

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(kFull, x, m);
    return x;
}

/// The warp sums of R values a lane, every lane getting all R (the same floats in every lane), in
/// R - 1 + 5 - log2(R) + R shuffles instead of 5 R: a reduce-scatter (each round, a lane keeps the
/// half of its values that its bit of the round's mask selects and adds its partner's copy of that
/// half) leaves lane l with the sum of value l / (32 / R), which then comes from lane r (32 / R) to
/// every lane. R: a power of two up to 32.
template <int R>
__device__ __forceinline__ void warp_sum_rows(float (&v)[R], int lane) {
    static_assert(R >= 1 && R <= 32 && (R & (R - 1)) == 0, "R a power of two up to 32");
#pragma unroll
    for (int n = R, m = 16; n > 1; n >>= 1, m >>= 1) {
        const bool upper = (lane & m) != 0;
#pragma unroll
        for (int k = 0; k < n / 2; ++k) {
            const float send = upper ? v[k] : v[k + n / 2];
            const float keep = upper ? v[k + n / 2] : v[k];
            v[k] = keep + __shfl_xor_sync(kFull, send, m);
        }
    }
#pragma unroll
    for (int m = 16 / R; m > 0; m >>= 1) v[0] += __shfl_xor_sync(kFull, v[0], m);
    const float mine = v[0];
#pragma unroll
    for (int r = 0; r < R; ++r) v[r] = __shfl_sync(kFull, mine, r * (32 / R));
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, m));
    return x;
}

// A warp holds a d-vector as E = d / 32 consecutive coordinates per lane
// (coordinate j = lane * E + e).

/// The CPU's butterfly (a + b, then a - b) on registers e and e + stride of x, for every e
/// without the stride bit (stride a compile-time constant after unrolling).
template <int E>
__device__ __forceinline__ void register_butterflies(float (&x)[E], int stride) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
        if ((e & stride) == 0) {
            const float a = x[e], b = x[e + stride];
            x[e] = __fadd_rn(a, b);
            x[e + stride] = __fsub_rn(a, b);
        }
    }
}

/// The same butterfly between lanes `lane` and `lane ^ m`, register by register: the lane
/// without bit m holds a and keeps a + b, the other holds b and keeps a - b. Both are one fused
/// multiply-add, fma(s, x, other) with s = +1 or -1: the product is exact, so the one rounding
/// gives the correctly rounded sum or difference (where a select of two adds took three
/// instructions).
template <int E>
__device__ __forceinline__ void lane_butterflies(float (&x)[E], int lane, int m) {
    const float s = (lane & m) ? -1.0f : 1.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const float other = __shfl_xor_sync(kFull, x[e], m);
        x[e] = __fmaf_rn(s, x[e], other);
    }
}

/// Orthonormal Walsh-Hadamard transform with the CPU's butterfly order (len = 1, 2, 4, ...;
/// a + b then a - b) and final scale, so results are bit-identical to fwht_orthonormal.
template <int E>
__device__ __forceinline__ void warp_fwht(float (&x)[E], int lane, float inv_sqrt_d) {
#pragma unroll
    for (int len = 1; len < E; len <<= 1) register_butterflies(x, len);
#pragma unroll
    for (int lm = 1; lm < 32; lm <<= 1) lane_butterflies(x, lane, lm);
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = __fmul_rn(x[e], inv_sqrt_d);
}

}  // namespace veloxquant::cuda
