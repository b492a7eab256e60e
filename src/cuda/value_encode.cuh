// The values of a long append, one warp per token: encode_values_kernel writes what
// dev::ValueDevice::encode (one thread per token) writes, bit for bit, for fp16 values and for
// Lloyd-Max values under a Hadamard rotation. The one-thread encoder keeps the rotated token in
// a local array of kMaxDim floats and walks its butterflies there; a warp keeps coordinate
// j = 32 c + lane in register c of its lane, so that the butterflies of length < 32 are lane
// shuffles and the longer ones register pairs, all in the CPU's stage order (fwht: lengths 1, 2,
// 4, ...; the pairs of a stage are independent). The three sums the CPU takes in j order (||v||^2,
// <u, c>, ||c||^2, in double; every term a product of two floats, exact in double) are warp
// trees, whose error bounds (ordered_sum_bounds) decide the floats the CPU derives from them,
// 1 / ||v|| and the scale, where both ends of the bounds give one float; where they do not
// (rarely: a rounding edge within the bounds), the lanes write their terms to shared memory and
// one lane adds them up in j order, as the CPU does. Session zb: 468 -> 321 us for the values of
// 32K tokens x 8 heads (ncu; cuda_h200_20261203zb_rabitq_dot_search_value_trees.txt).
// On the H200, one append of 32K tokens x 8 heads at d = 128 with 4-bit values (bench_codec_cache,
// cuda_h200_20261202v_encode_ab.txt) took 0.3-0.9 ms less for every method than with the values
// in the one-thread and team encoders: turboquant 2.87 -> 1.95 ms, polarquant 2.55 -> 2.04.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "cuda/codec_kernels.cuh"
#include "cuda/cuda_cache.h"
#include "cuda/runtime_facts.h"
#include "device_codecs/device_common.h"
#include "device_codecs/value_device.h"

namespace veloxquant::cuda::codec {

constexpr int kValueWarps = 8;  // tokens in flight per CTA of encode_values_kernel

/// What encode_values_kernel reads of an EncodeParams<Codec>: the units, their pages and their
/// value codecs (the key codec's type does not enter, so one kernel serves every method).
struct ValueUnits {
    const dev::ValueDevice::Params* values = nullptr;  ///< [heads] (Store::values)
    const CodecParamsView* kin = nullptr;              ///< Store::kin
    const HeadRegions* regions = nullptr;
    uint8_t* pool = nullptr;
    const uint8_t* const* pools = nullptr;
    const int32_t* page_table = nullptr;
    uint64_t page_bytes = 0;
    int heads = 0, d = 0, units = 0, n = 0, start = 0;
    const int32_t* starts = nullptr;
    const float* rows = nullptr;  ///< [units][n][d] value rows

    template <class Codec>
    static ValueUnits of(const EncodeParams<Codec>& a) {
        ValueUnits v;
        v.values = a.store.values;
        v.kin = a.store.kin;
        v.regions = a.store.regions;
        v.pool = a.store.pool;
        v.pools = a.pools;
        v.page_table = a.store.page_table;
        v.page_bytes = a.store.page_bytes;
        v.heads = a.store.heads;
        v.d = a.store.d;
        v.units = a.units;
        v.n = a.n;
        v.start = a.start;
        v.starts = a.starts;
        v.rows = a.values;
        return v;
    }
};

/// Whether encode_values_kernel encodes values of these parameters (else the one-thread and
/// team encoders do): fp16, or a Hadamard rotation of at most 256 coordinates.
inline bool warp_encodes_values(const dev::ValueDevice::Params& p) {
    return p.d <= dev::kMaxDim && (p.bits == 16 || p.rotation.hadamard);
}

/// Registers per lane for d coordinates: one for d <= 32, else d / 32 (a Hadamard d is a power of
/// two; fp16 rows of other widths take the next power of two).
inline int value_lane_registers(int d) {
    int c = 1;
    while (32 * c < d) c *= 2;
    return c;
}

/// sum_j terms[j] in j order, as the CPU's loops add them. A 16-byte aligned array is read eight
/// terms at a time ahead of their additions, so that the chain waits on the adds alone, not on a
/// shared-memory load each.
__device__ __forceinline__ double ordered_sum(const double* terms, int d) {
    double s = 0.0;
    int j = 0;
    if ((reinterpret_cast<uintptr_t>(terms) & 15) == 0) {
        const auto* pairs = reinterpret_cast<const double2*>(terms);
#pragma unroll 2
        for (; j + 8 <= d; j += 8) {
            double2 v[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) v[k] = pairs[j / 2 + k];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                s += v[k].x;
                s += v[k].y;
            }
        }
    }
    for (; j < d; ++j) s += terms[j];
    return s;
}

/// Bounds [lo, hi] on ordered_sum of d doubles from `tree`, a warp's sum of the same terms in
/// another order, and `abs_tree`, its sum of their magnitudes: any two orders of adding them
/// agree within 2 gamma_(d-1) sum_j |term_j|, gamma_k = k 2^-53 / (1 - k 2^-53) (Higham,
/// Accuracy and Stability of Numerical Algorithms, §4.2), here widened to (d + 8) 2^-51 for the
/// bounds' own rounding. False where abs_tree lies past 2^1000 (a partial sum could overflow).
/// (Sums whose result is subnormal are exact, so underflow does not break the bound.)
__device__ __forceinline__ bool ordered_sum_bounds(double tree, double abs_tree, int d, double& lo,
                                                   double& hi) {
    if (!(abs_tree <= 0x1p1000)) return false;
    const double slack = (d + 8) * 0x1p-51 * abs_tree;
    lo = tree - slack;
    hi = tree + slack;
    return true;
}

/// fwht's butterflies (a, b) -> (a + b, a - b) of lengths 1, 2, 4, ... < d (not its final
/// 1 / sqrt(d)) on a warp's vector, coordinate 32 c + lane in y[c]: lengths below 32 are lane
/// shuffles, the longer ones register pairs. d is a power of two; lanes past d hold zeros.
template <int C>
__device__ __forceinline__ void warp_fwht_butterflies(float (&y)[C], int d, int lane) {
    for (int len = 1; len < 32 && len < d; len <<= 1) {
        const bool upper = (lane & len) != 0;
#pragma unroll
        for (int c = 0; c < C; ++c) {
            const float other = __shfl_xor_sync(kFull, y[c], len);
            y[c] = upper ? other - y[c] : y[c] + other;
        }
    }
#pragma unroll
    for (int len = 1; len < C; len <<= 1)
#pragma unroll
        for (int c = 0; c < C; ++c)
            if ((c & len) == 0) {
                const float lo = y[c], hi = y[c + len];
                y[c] = lo + hi;
                y[c + len] = lo - hi;
            }
}

/// Shared memory of one warp of encode_values_kernel: two rows of d double terms, then the
/// code's words (at most 8 bits a coordinate).
__host__ __device__ constexpr int value_warp_smem_bytes(int d) {
    return (2 * d * 8 + (d + 3) / 4 * 4 + 15) / 16 * 16;
}

/// One warp per (unit, token) item, grid-strided; C registers per lane (C =
/// value_lane_registers(d)).
template <int C>
__global__ void __launch_bounds__(kValueWarps * 32) encode_values_kernel(const ValueUnits a) {
    extern __shared__ __align__(16) uint8_t value_smem[];
    const int lane = static_cast<int>(threadIdx.x) & 31, w = static_cast<int>(threadIdx.x) >> 5;
    const int d = a.d;
    double* first = reinterpret_cast<double*>(value_smem + w * value_warp_smem_bytes(d));
    double* second = first + d;
    uint32_t* code_words = reinterpret_cast<uint32_t*>(second + d);
    const long long items = static_cast<long long>(a.units) * a.n;
    for (long long item = static_cast<long long>(blockIdx.x) * kValueWarps + w; item < items;
         item += static_cast<long long>(gridDim.x) * kValueWarps) {
        const int u = static_cast<int>(item / a.n), t = static_cast<int>(item % a.n);
        const int sequence = a.pools != nullptr ? u / a.heads : 0;
        const int h = a.pools != nullptr ? u % a.heads : u;
        const int pos = (a.pools != nullptr ? a.starts[sequence] : a.start) + t;
        const dev::ValueDevice::Params& p =
            a.kin != nullptr
                ? static_cast<const dev::ValueDevice::Params*>(a.kin[sequence].values)[h]
                : a.values[h];
        uint8_t* pool = a.pools != nullptr ? const_cast<uint8_t*>(a.pools[sequence]) : a.pool;
        uint8_t* page = pool + static_cast<uint64_t>(a.page_table[pos / kPage]) * a.page_bytes;
        const HeadRegions R = a.regions[h];
        const int slot = pos % kPage;
        uint8_t* code = page + R.value_codes + slot * R.value_code_bytes;
        const float* src = a.rows + item * d;
        float y[C];
#pragma unroll
        for (int c = 0; c < C; ++c) y[c] = 32 * c + lane < d ? src[32 * c + lane] : 0.0f;
        if (p.bits == 16) {
#pragma unroll
            for (int c = 0; c < C; ++c) {
                const int j = 32 * c + lane;
                if (j >= d) continue;
                const uint16_t half = dev::float_to_half_bits(y[c]);
                code[2 * j] = static_cast<uint8_t>(half & 0xffu);
                code[2 * j + 1] = static_cast<uint8_t>(half >> 8);
            }
            continue;
        }
        // ||v||^2 a warp tree sum of the exact terms v_j^2; where both of its bounds give one
        // 1 / ||v|| in float (what the quantizer sees), norm_lo and norm_hi bound the CPU's ||v||,
        // else lane 0 adds the terms in j order (norm_lo = norm_hi = its root).
        double vv = 0.0;
#pragma unroll
        for (int c = 0; c < C; ++c)
            if (32 * c + lane < d) vv += static_cast<double>(y[c]) * y[c];
        vv = warp_sum(vv);  // the same on every lane: each step adds a pair in either order
        double norm_lo = 0.0, norm_hi = 0.0, vv_lo, vv_hi;
        float inv = 0.0f;
        bool bounded = ordered_sum_bounds(vv, vv, d, vv_lo, vv_hi);
        if (bounded) {  // lane 0 the lower end, lane 1 the upper
            const double end = sqrt(lane == 1 ? vv_hi : vv_lo);
            const float end_inv = end > 0.0 ? static_cast<float>(1.0 / end) : 0.0f;
            norm_lo = __shfl_sync(kFull, end, 0);
            norm_hi = __shfl_sync(kFull, end, 1);
            inv = __shfl_sync(kFull, end_inv, 0);
            bounded = inv == __shfl_sync(kFull, end_inv, 1) && (norm_lo > 0.0) == (norm_hi > 0.0);
        }
        if (!bounded) {
#pragma unroll
            for (int c = 0; c < C; ++c)
                if (32 * c + lane < d) first[32 * c + lane] = static_cast<double>(y[c]) * y[c];
            __syncwarp();
            norm_lo = norm_hi =
                sqrt(__shfl_sync(kFull, lane == 0 ? ordered_sum(first, d) : 0.0, 0));
            inv = norm_lo > 0.0 ? static_cast<float>(1.0 / norm_lo) : 0.0f;
        }
        const int bits = p.bits, code_bytes = R.value_code_bytes;
        for (int i = lane; i < (code_bytes + 3) / 4; i += 32) code_words[i] = 0;
        float scale = 0.0f;
        if (norm_lo > 0.0 && inv <= FLT_MAX) {  // else v is stored as 0, as ValueDevice::encode
                                                // y = H (signs * v) / sqrt(d)
#pragma unroll
            for (int c = 0; c < C; ++c)
                if (32 * c + lane < d) y[c] *= p.rotation.signs[32 * c + lane];
            warp_fwht_butterflies<C>(y, d, lane);
            const float rescale = 1.0f / sqrtf(static_cast<float>(d));
            const int levels = 1 << bits;
            __syncwarp();  // every lane has read `first` (where lane 0 summed it)
            double uc = 0.0, uc_abs = 0.0, cc = 0.0;  // <u, c> and ||c||^2 as trees
#pragma unroll
            for (int c = 0; c < C; ++c) {
                const int j = 32 * c + lane;
                if (j >= d) continue;
                const float x = (y[c] * rescale) * inv;
                const int idx = dev::quantize_sorted(p.boundaries, levels - 1, x);
                const double centroid = p.centroids[idx], xc = x * centroid;
                first[j] = xc;  // the terms kept for the ordered sums, where the bounds fail
                second[j] = centroid * centroid;
                uc += xc;
                uc_abs += fabs(xc);
                cc += centroid * centroid;
                const int bit = j * bits, word = bit >> 5, shift = bit & 31;
                atomicOr(code_words + word, static_cast<uint32_t>(idx) << shift);
                if (shift + bits > 32)
                    atomicOr(code_words + word + 1, static_cast<uint32_t>(idx) >> (32 - shift));
            }
            uc = warp_sum(uc);
            uc_abs = warp_sum(uc_abs);
            cc = warp_sum(cc);
            // scale = ||v|| <u, c> / ||c||^2, in the CPU's operations: monotonic in each
            // operand over the bounds' box (cc > 0), so its float lies between the least and the
            // greatest of the box's eight corners (lane & 7 picks one); where those agree, that
            // is the CPU's float. Else the ordered sums.
            double uc_lo, uc_hi, cc_lo, cc_hi;
            bool decided = cc <= 0.0;  // non-negative terms: the CPU's cc > 0 exactly then too
            if (!decided && ordered_sum_bounds(uc, uc_abs, d, uc_lo, uc_hi) &&
                ordered_sum_bounds(cc, cc, d, cc_lo, cc_hi) && cc_lo > 0.0) {
                const double n = lane & 1 ? norm_hi : norm_lo, u = lane & 2 ? uc_hi : uc_lo,
                             q = lane & 4 ? cc_hi : cc_lo;
                float least = static_cast<float>(n * u / q), most = least;
                for (int offset = 1; offset < 8; offset <<= 1) {
                    least = fminf(least, __shfl_xor_sync(kFull, least, offset));
                    most = fmaxf(most, __shfl_xor_sync(kFull, most, offset));
                }
                decided = least == most;
                scale = least;
            }
            if (!decided) {
                __syncwarp();
                const double sum = lane < 2 ? ordered_sum(lane == 0 ? first : second, d) : 0.0;
                const double uc_exact = __shfl_sync(kFull, sum, 0);
                const double cc_exact = __shfl_sync(kFull, sum, 1);
                if (norm_lo != norm_hi) {  // the terms v_j^2 again, from the row
                    for (int j = lane; j < d; j += 32)
                        first[j] = static_cast<double>(src[j]) * src[j];
                    __syncwarp();
                    norm_lo = sqrt(__shfl_sync(kFull, lane == 0 ? ordered_sum(first, d) : 0.0, 0));
                }
                scale = static_cast<float>(norm_lo * uc_exact / cc_exact);
            }
        }
        __syncwarp();
        const auto* bytes = reinterpret_cast<const uint8_t*>(code_words);  // little-endian words
        for (int b = lane; b < code_bytes; b += 32) code[b] = bytes[b];
        if (lane == 0) reinterpret_cast<float*>(page + R.value_scalars)[slot] = scale;
        __syncwarp();  // the next item's terms and words reuse this warp's shared memory
    }
}

/// Launches encode_values_kernel for every value row of `a` (a.rows non-null): one wave of as
/// many CTAs as the SMs hold, or fewer for a short append.
template <int C>
void launch_encode_values_c(const ValueUnits& a, int sms, cudaStream_t stream) {
    const int smem = kValueWarps * value_warp_smem_bytes(a.d);
    int per_sm = 0;
    check_cuda(resident_ctas(encode_values_kernel<C>, kValueWarps * 32, smem, per_sm),
               "occupancy of the value encoder");
    const long long items = static_cast<long long>(a.units) * a.n;
    const long long wanted = (items + kValueWarps - 1) / kValueWarps;
    const auto blocks =
        static_cast<unsigned>(std::min<long long>(wanted, static_cast<long long>(per_sm) * sms));
    encode_values_kernel<C><<<blocks, kValueWarps * 32, smem, stream>>>(a);
    check_cuda(cudaGetLastError(), "value encode kernel");
}

/// The kernel launch_encode_values takes at head dimension d (for its attributes).
inline const void* encode_values_kernel_for(int d) {
    switch (value_lane_registers(d)) {
        case 1:
            return reinterpret_cast<const void*>(&encode_values_kernel<1>);
        case 2:
            return reinterpret_cast<const void*>(&encode_values_kernel<2>);
        case 4:
            return reinterpret_cast<const void*>(&encode_values_kernel<4>);
        default:
            return reinterpret_cast<const void*>(&encode_values_kernel<8>);
    }
}

inline void launch_encode_values(const ValueUnits& a, int sms, cudaStream_t stream) {
    switch (value_lane_registers(a.d)) {
        case 1:
            return launch_encode_values_c<1>(a, sms, stream);
        case 2:
            return launch_encode_values_c<2>(a, sms, stream);
        case 4:
            return launch_encode_values_c<4>(a, sms, stream);
        default:
            return launch_encode_values_c<8>(a, sms, stream);
    }
}

}  // namespace veloxquant::cuda::codec
