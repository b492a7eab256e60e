// The running double sums of non-negative floats in index order (the CPU's ordered_sum: s_0 =
// 0, s_i = fl(s_{i-1} + x_i)) computed by a whole CTA instead of one thread, where that gives
// the same doubles.
//
// Why it can: write every x_i as an integer multiple T_i of 2^b, b the lowest exponent among
// them (a float is a 24-bit integer times a power of two). If every exact prefix P_i = T_0 +
// ... + T_i is representable in a double (its significant bits span at most 53), then no
// sequential add rounds (s_{i-1} = P_{i-1} 2^b and the exact s_{i-1} + x_i = P_i 2^b is
// representable), so s_i = P_i 2^b whatever order the integers were added in. The CTA checks
// that condition for every prefix and otherwise reports false; the caller then runs the
// sequential sum. Terms of similar size, such as the squared distances of k-means, meet it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace veloxquant::cuda {

namespace exact_sum_detail {

/// x as T 2^(E - 150): T its 24-bit significand (the implicit bit included), E its exponent
/// field (1 for subnormals). Zero gives T = 0.
__device__ __forceinline__ void split_float(float x, uint32_t& t, int& e) {
    const uint32_t bits = __float_as_uint(x);
    const uint32_t field = (bits >> 23) & 0xff, mantissa = bits & 0x7fffff;
    e = field == 0 ? 1 : static_cast<int>(field);
    t = field == 0 ? mantissa : (mantissa | 0x800000u);
}

/// Representable in a double: the bits from the lowest set one up fit in 53.
__device__ __forceinline__ bool fits_double(unsigned long long p) {
    return p == 0 || (p >> (__ffsll(static_cast<long long>(p)) - 1)) < (1ull << 53);
}

}  // namespace exact_sum_detail

/// All kThreads threads of the CTA call it with the same x (shared memory, n >= 1 floats, each
/// >= 0, +-0 and finite): true when every running sum is exact in double, with running[i] = s_i
/// where running is given (shared memory) and *total = s_{n-1} in every thread; false (nothing
/// written but possibly running) when the caller must sum sequentially: a term negative, Inf or
/// NaN, a span of exponents too wide for 64-bit integers, or a prefix that rounds.
template <int kThreads>
__device__ bool exact_running_sums(const float* x, int n, double* running, double* total) {
    using namespace exact_sum_detail;
    static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, at most 32 of them");
    __shared__ int lowest, highest;
    __shared__ unsigned long long warp_sums[kThreads / 32];
    __shared__ unsigned long long grand_total;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int run = (n + kThreads - 1) / kThreads, lo = min(t * run, n), hi = min(lo + run, n);
    if (t == 0) {
        lowest = 255;
        highest = 0;
    }
    __syncthreads();
    int my_low = 255, my_high = 0;
    bool bad = false;
    for (int i = lo; i < hi; ++i) {
        const uint32_t bits = __float_as_uint(x[i]);
        if ((bits & 0x7fffffffu) == 0) continue;  // +-0 adds nothing
        if ((bits >> 31) != 0 || ((bits >> 23) & 0xff) == 0xff) bad = true;
        uint32_t m;
        int e;
        split_float(x[i], m, e);
        my_low = min(my_low, e);
        my_high = max(my_high, e);
    }
    if (my_low <= my_high) {
        atomicMin(&lowest, my_low);
        atomicMax(&highest, my_high);
    }
    if (__syncthreads_or(bad)) return false;
    const int base = lowest;
    // T_i < 2^(24 + span), a sum of n of them below 2^(24 + span + ceil(log2 n)) <= 2^64.
    int log_n = 0;
    while ((1 << log_n) < n) ++log_n;
    if (highest >= base && highest - base > 64 - 24 - log_n) return false;
    auto term = [&](int i) -> unsigned long long {
        uint32_t m;
        int e;
        split_float(x[i], m, e);
        return m == 0 ? 0ull : static_cast<unsigned long long>(m) << (e - base);
    };
    unsigned long long mine = 0;
    for (int i = lo; i < hi; ++i) mine += term(i);
    unsigned long long before = mine;  // inclusive over the warp, then less the own
    for (int offset = 1; offset < 32; offset <<= 1) {
        const unsigned long long o = __shfl_up_sync(0xffffffffu, before, offset);
        if (lane >= offset) before += o;
    }
    if (lane == 31) warp_sums[warp] = before;
    before -= mine;
    __syncthreads();
    if (warp == 0) {
        const unsigned long long w = lane < kThreads / 32 ? warp_sums[lane] : 0ull;
        unsigned long long in = w;
        for (int offset = 1; offset < 32; offset <<= 1) {
            const unsigned long long o = __shfl_up_sync(0xffffffffu, in, offset);
            if (lane >= offset) in += o;
        }
        if (lane < kThreads / 32) warp_sums[lane] = in - w;  // exclusive
        if (lane == 31) grand_total = in;
    }
    __syncthreads();
    unsigned long long p = warp_sums[warp] + before;
    for (int i = lo; i < hi; ++i) {
        p += term(i);
        if (!fits_double(p)) bad = true;
        if (running != nullptr) running[i] = ldexp(static_cast<double>(p), base - 150);
    }
    if (__syncthreads_or(bad)) return false;
    *total = ldexp(static_cast<double>(grand_total), base - 150);
    return true;
}

}  // namespace veloxquant::cuda
