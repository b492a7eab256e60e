// rabitq's keys of a long append: one warp per token, kRbWarps tokens in flight per CTA, a CTA's
// tokens all of one unit, whose centroids it stages once. At 3 bits and d = 128, one append of
// 32K tokens x 8 heads (keys and values) took 23.7 ms on the H200 with the team encoder (a CTA of
// 128 threads a token, team_spectral_rabitq_encoders.cuh; run 89), 7.16 ms with this kernel and
// one lane scanning the events (run 91), 3.96-3.98 ms with the scan across the warp
// (cuda_h200_20261202x_rabitq_warp_scan_runs1_2.txt), 3.50-3.53 ms at twelve warps a CTA
// (cuda_h200_20261203y_encoders.txt) and 2.86-2.90 ms now (the key kernel 2.45 ms, 4640 warp
// instructions a token; cuda_h200_20261203zc_rabitq_sort_keys_input_check.txt). Latency bound:
// ~6000 warp instructions a token issued 0.48 a scheduler cycle, so more warps an SM paid.
//
// Per token, as RaBitQDevice::encode and the CPU's quantize (methods/rabitq.cpp):
//  1. x = H (signs * k) / sqrt(d), coordinate 32 c + lane in register c (warp_fwht_butterflies).
//  2. The nearest centroid: each lane scores its centroids (lane + 64 i and lane + 64 i + 32,
//     from 16-byte loads of x and of rows staged d + kRbRowPad floats apart) by ||c||^2 - 2 <x, c>,
//     and where one alone lies within a proven error bound of the least, that is the CPU's
//     nearest (rb_nearest_by_dot); else squared_distance's eight partial sums for every centroid,
//     folded across the warp to the first least (rb_nearest).
//  3. The residual e in double; ||e||_1 a warp tree sum where it is provably exact (then every
//     order gives the same double), else in j order by lane 0; ||e||^2 a warp tree sum, whose
//     error bound decides f's float where it can (rb_scale), else lane 0's sum in j order.
//  4. Extended RaBitQ's critical values t = s / |e_j| (arXiv 2409.09913 §3.2) sorted by (t, j)
//     as the CPU sorts them: by 64-bit keys of an estimate of t (within 2^-45 t) with the tag in
//     its low 16 bits, counted into as many equal-width buckets as there are events (shared
//     atomics), the counts scanned, the events scattered, each bucket (one or two events mostly)
//     insertion-sorted by one lane, every neighbouring pair checked against t itself where their
//     keys are close. Any correct sort gives the same order (rabitq_event_sort.cuh).
//  5. The best prefix: rb_best_prefix_warp, each lane a run of events, where it can prove its
//     result the sequential scan's (almost always); else one lane repeats the CPU's double
//     updates in event order.
//  6. The best prefix's steps (a shared atomicMax per event), <x_bar, e> (as ||e||_1), the levels
//     packed in shared words, then the code bytes and f stored.
// The codes are the CPU's bit for bit (this file compiles with --fmad=false, as every encoder).
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include "cuda/bulk_key_encode.h"
#include "cuda/codec_kernels.cuh"
#include "cuda/cuda_cache.h"
#include "cuda/rabitq_event_sort.cuh"
#include "cuda/rabitq_nearest.cuh"
#include "cuda/runtime_facts.h"
#include "cuda/value_encode.cuh"
#include "device_codecs/rabitq_device.h"

namespace veloxquant::cuda::codec {

// Tokens in flight per CTA, one per warp. At d <= 128 two CTAs an SM fit beside their centroids
// (at d = 128, 3 bits, 64 centroids: 2 x 111 KB), 24 warps at 80 registers; eight warps a CTA
// (16 an SM at 99 registers) took 3.96 ms where twelve take 3.59 for 32K tokens x 8 heads.
constexpr int kRbWarps = 12;
constexpr int kRbTile = 256;        // tokens per CTA (one unit's), kRbTile / kRbWarps per warp
constexpr int kRbMaxEvents = 1024;  // d (M - 1) past this: the team encoder (and its heap)

/// One warp's shared memory for a token, in bytes from the warp's base (16-byte aligned):
/// `doubles`: max(d, events) doubles (x for the centroid search, then the terms of ||e||^2, the
/// events' sort keys, the scan's q, the terms of <x_bar, e>); `abs_e`: |e_j|; `cursor`:
/// max(events + 1, d) ints (the buckets' cursors, then the steps); `words`: the code; `tags`: the
/// events' j << 8 | s.
struct RbWarpLayout {
    int events = 0;  // d (M - 1): every (j, s) a token may list
    int abs_e = 0, cursor = 0, words = 0, tags = 0, bytes = 0;

    __host__ __device__ static RbWarpLayout of(const dev::RaBitQDevice::Params& p) {
        RbWarpLayout l;
        const int d = p.d;
        l.events = d * ((1 << (p.bits - 1)) - 1);
        l.abs_e = 8 * (d > l.events ? d : l.events);
        l.cursor = l.abs_e + 8 * d;
        l.words = l.cursor + 4 * (l.events + 1 > d ? l.events + 1 : d);
        l.tags = l.words + (dev::RaBitQDevice::code_bytes(p) + 3) / 4 * 4;
        l.bytes = (l.tags + 2 * l.events + 15) / 16 * 16;
        return l;
    }
};

/// Dynamic shared memory: kRbWarps warp regions, then the unit's centroids if they fit (else the
/// kernel reads them from global memory).
inline size_t rabitq_warps_smem_bytes(const dev::RaBitQDevice::Params& p) {
    return static_cast<size_t>(kRbWarps) * RbWarpLayout::of(p).bytes;
}
inline size_t rabitq_centroid_smem_bytes(int clusters, int d) {
    return sizeof(float) * static_cast<size_t>(clusters) * (d + kRbRowPad);
}

/// The staged centroids' squared norms, each in its row's first pad float (rows[c stride + d]),
/// and their largest in *max_norm2 (zero before; NaN where a norm is), for rb_nearest_by_dot. By
/// the whole CTA, between barriers.
__device__ inline void rb_centroid_norms(float* rows, int stride, int clusters, int d,
                                         float* max_norm2) {
    for (int c = static_cast<int>(threadIdx.x); c < clusters; c += static_cast<int>(blockDim.x)) {
        float* row = rows + static_cast<size_t>(c) * stride;
        float s = 0.0f;
        for (int j = 0; j < d; ++j) s = __fmaf_rn(row[j], row[j], s);
        row[d] = s;
        // Non-negative floats order as their bits, and a NaN's bits lie above +inf's.
        atomicMax(reinterpret_cast<unsigned*>(max_norm2), __float_as_uint(s));
    }
}

/// rb_nearest's answer, or -1 (on every lane) where this cannot prove it. Each centroid is
/// scored by A_c = ||c||^2 - 2 <x, c> (||x - c||^2 less ||x||^2, the same for all), one fused
/// multiply-add a coordinate against squared_distance's three: A_c is within
/// gamma_(d+2) (||x|| + ||c||)^2 of its exact value and the CPU's squared_distance within
/// gamma_(d/8+10) of ||x - c||^2 (gamma_k = k 2^-24 / (1 - k 2^-24); Higham, Accuracy and
/// Stability of Numerical Algorithms, §3.1), both below (2.3 d + 25) 2^-24 (||x||^2 + ||c||^2).
/// So a centroid whose A_c exceeds the least by more than `margin` = (8 d + 128) 2^-24
/// (||x||^2 + max ||c||^2) + 2^-126 (subnormal results' errors, 2^-150 an operation) has a
/// larger CPU distance than the least's; where one centroid alone
/// is within it, that one is the CPU's nearest. Rows as rb_nearest's, each with its squared
/// norm at rows[c stride + d] (rb_centroid_norms); `x_norm2` ~ ||x||^2 (within 2^-10).
__device__ inline int rb_nearest_by_dot(const float* x, const float* rows, int stride, int clusters,
                                        int d, float x_norm2, float max_norm2, int lane) {
    const float margin = (8 * d + 128) * 0x1p-24f * (x_norm2 + max_norm2) + 0x1p-126f;
    float least = INFINITY, second = INFINITY;  // this lane's two least scores
    int best = -1;
    bool finite = margin <= 0x1p100f;
    auto keep = [&](float score, int c) {
        finite &= score >= -0x1p126f && score <= 0x1p126f;
        if (score < least) {
            second = least;
            least = score;
            best = c;
        } else {
            second = fminf(second, score);
        }
    };
    for (int c = lane; c < clusters; c += 64) {
        const int c1 = min(c + 32, clusters - 1);  // past the last: scored, not kept
        const float* row0 = rows + static_cast<size_t>(c) * stride;
        const float* row1 = rows + static_cast<size_t>(c1) * stride;
        const auto* xv = reinterpret_cast<const float4*>(x);
        const auto* r0 = reinterpret_cast<const float4*>(row0);
        const auto* r1 = reinterpret_cast<const float4*>(row1);
        float4 p0 = {0.0f, 0.0f, 0.0f, 0.0f}, p1 = p0;
        for (int q = 0; q < d / 4; ++q) {
            const float4 v = xv[q], a = r0[q], b = r1[q];
            p0 = {__fmaf_rn(v.x, a.x, p0.x), __fmaf_rn(v.y, a.y, p0.y), __fmaf_rn(v.z, a.z, p0.z),
                  __fmaf_rn(v.w, a.w, p0.w)};
            p1 = {__fmaf_rn(v.x, b.x, p1.x), __fmaf_rn(v.y, b.y, p1.y), __fmaf_rn(v.z, b.z, p1.z),
                  __fmaf_rn(v.w, b.w, p1.w)};
        }
        keep(row0[d] - 2.0f * ((p0.x + p0.y) + (p0.z + p0.w)), c);
        if (c + 32 < clusters) keep(row1[d] - 2.0f * ((p1.x + p1.y) + (p1.z + p1.w)), c + 32);
    }
    if (!__all_sync(kFull, finite)) return -1;
    float all_least = least;
    for (int offset = 16; offset > 0; offset >>= 1)
        all_least = fminf(all_least, __shfl_xor_sync(kFull, all_least, offset));
    const float cut = all_least + margin;
    const unsigned holders = __ballot_sync(kFull, least <= cut);
    if (__popc(holders) != 1 || __any_sync(kFull, second <= cut)) return -1;
    return __shfl_sync(kFull, best, __ffs(holders) - 1);
}

/// v is a multiple of 2^rb_lowest_bit(v) (INT_MAX for v = 0): the exponent of its lowest set bit.
__device__ inline int rb_lowest_bit(double v) {
    const auto bits = static_cast<unsigned long long>(__double_as_longlong(v));
    const int biased = static_cast<int>(bits >> 52) & 0x7ff;
    unsigned long long mantissa = bits & ((1ull << 52) - 1);
    if (biased != 0) mantissa |= 1ull << 52;
    if (mantissa == 0) return INT_MAX;
    return (biased == 0 ? -1074 : biased - 1075) + __ffsll(static_cast<long long>(mantissa)) - 1;
}

/// The least of the lanes' x, on every lane.
__device__ inline int rb_warp_min(int x) {
    for (int offset = 16; offset > 0; offset >>= 1) x = min(x, __shfl_xor_sync(kFull, x, offset));
    return x;
}

/// Whether any order of adding n non-negative terms, each a multiple of 2^low, gives the same
/// double: when their sum (near `sum`, a rounded estimate) is below 2^(52 + low), every partial
/// sum is a multiple of 2^low below 2^(53 + low), so exact.
__device__ inline bool rb_sums_exact(double sum, int low) {
    return low == INT_MAX || sum < ldexp(1.0, 52 + low);
}

/// sum_j terms_j in j order (ordered_sum over `terms` in shared memory, as the CPU adds them),
/// where the lanes hold terms 32 c + lane in v[c]: a warp tree sum where rb_sums_exact proves
/// it the same, else lane 0's ordered sum. On every lane.
template <int C>
__device__ double rb_term_sum(const double (&v)[C], const double* terms, int d, int lane) {
    double sum = 0.0;
    int low = INT_MAX;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        sum += v[c];
        low = min(low, rb_lowest_bit(v[c]));
    }
    low = rb_warp_min(low);
    sum = __shfl_sync(kFull, warp_sum(sum), 0);  // lanes' float sums may differ: lane 0's
    if (rb_sums_exact(sum, low)) return sum;
    return __shfl_sync(kFull, lane == 0 ? ordered_sum(terms, d) : 0.0, 0);
}

/// The length of the best prefix of the n sorted events (rabitq.cpp's scan: the same double
/// operations in event order), on the calling lane; event i's |e| is abs_e[tags[i] >> 8].
__device__ inline int rb_best_prefix(const double* abs_e, const uint16_t* tags, int n, int d,
                                     double abs_sum) {
    double ip = 0.5 * abs_sum;  // <s + 1/2, |e|>
    double nn = 0.25 * d;       // ||s + 1/2||^2
    double best = ip * ip / nn;
    int best_len = 0;
    for (int i0 = 0; i0 < n; i0 += 4) {
        double a[4];
        int s[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {  // loads off the chain through ip, nn and best
            const int i = min(i0 + k, n - 1);
            a[k] = abs_e[tags[i] >> 8];
            s[k] = tags[i] & 0xff;
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            if (i0 + k >= n) break;
            ip += a[k];
            nn += 2.0 * (s[k] - 1) + 2.0;  // (s + 1/2)^2 - (s - 1/2)^2, steps_j = s - 1 before
            if (ip * ip > best * nn) {
                best = ip * ip / nn;
                best_len = i0 + k + 1;
            }
        }
    }
    return best_len;
}

/// rb_best_prefix's result computed by the whole warp, or -1 (on every lane) where it cannot
/// prove the two the same. `low`: every |e_j| is a multiple of 2^low.
///  - Each lane takes a run of consecutive events. Where every ip_i = ||e||_1 / 2 + a_1 + .. + a_i
///    is exact (rb_sums_exact over the total, at most (M - 1/2) ||e||_1), ip_i and nn_i (sums of
///    integers and quarters, always exact) come from exclusive scans of the runs' totals.
///  - The records are guessed from an exclusive prefix max B_i of Q_i = ip_i^2 / nn_i (from
///    Q_0 = the empty prefix's); each guess Q_i > B_i is checked against the scan's own test
///    ip_i^2 > B_i nn_i. Where all agree, the sequential scan keeps the same records, since its
///    best is the last record's Q, which is B_i.
__device__ inline int rb_best_prefix_warp(const double* abs_e, const uint16_t* tags, double* q,
                                          int n, int d, int m, double abs_sum, int low, int lane) {
    const double ip0 = 0.5 * abs_sum, nn0 = 0.25 * d;
    if (!rb_sums_exact((m - 0.5) * abs_sum, min(low, rb_lowest_bit(ip0)))) return -1;
    const int run = (n + 31) / 32, lo = min(lane * run, n), hi = min(lo + run, n);
    double part = 0.0;
    int steps = 0;
    for (int i = lo; i < hi; ++i) {
        part += abs_e[tags[i] >> 8];
        steps += tags[i] & 0xff;
    }
    double ip_before = part;  // inclusive scans, exact, then less the lane's own
    int steps_before = steps;
    for (int offset = 1; offset < 32; offset <<= 1) {
        const double o = __shfl_up_sync(kFull, ip_before, offset);
        const int os = __shfl_up_sync(kFull, steps_before, offset);
        if (lane >= offset) {
            ip_before += o;
            steps_before += os;
        }
    }
    ip_before -= part;
    steps_before -= steps;
    const double ip_first = ip0 + ip_before, nn_first = nn0 + 2.0 * steps_before;
    double ip = ip_first, nn = nn_first, q_max = 0.0;
    for (int i = lo; i < hi; ++i) {
        ip += abs_e[tags[i] >> 8];
        nn += 2.0 * (tags[i] & 0xff);
        q[i] = ip * ip / nn;
        q_max = fmax(q_max, q[i]);
    }
    for (int offset = 1; offset < 32; offset <<= 1) {
        const double o = __shfl_up_sync(kFull, q_max, offset);
        if (lane >= offset) q_max = fmax(q_max, o);
    }
    const double before = __shfl_up_sync(kFull, q_max, 1);
    double best = ip0 * ip0 / nn0;
    if (lane > 0) best = fmax(best, before);
    ip = ip_first;
    nn = nn_first;
    int best_len = 0;
    bool agree = true;
    for (int i = lo; i < hi; ++i) {
        ip += abs_e[tags[i] >> 8];
        nn += 2.0 * (tags[i] & 0xff);
        const bool record = q[i] > best;
        agree &= record == (ip * ip > best * nn);
        if (record) {
            best = q[i];
            best_len = i + 1;
        }
    }
    if (!__all_sync(kFull, agree)) return -1;
    for (int offset = 16; offset > 0; offset >>= 1)
        best_len = max(best_len, __shfl_xor_sync(kFull, best_len, offset));
    return best_len;
}

/// f = ||e||^2 / <x_bar, e> rounded to float as the CPU rounds it, its ||e||^2 the ordered sum
/// of the terms e_j^2 (lanes' abs[c]^2), from `tree`, the warp's sum of the same terms: the
/// ordered sum lies within ordered_sum_bounds, and where both bounds round to one float, that
/// float is f (the quotient and its rounding are monotonic). Else lane 0 adds the terms in
/// order, through `terms` (d doubles). On every lane.
template <int C>
__device__ float rb_scale(double tree, double xe, const double (&abs)[C], double* terms, int d,
                          int lane) {
    double lo, hi;
    if (ordered_sum_bounds(tree, tree, d, lo, hi)) {
        const auto f = static_cast<float>((lane == 1 ? hi : lo) / xe);
        const float low = __shfl_sync(kFull, f, 0);
        if (low == __shfl_sync(kFull, f, 1)) return low;
    }
    __syncwarp();
#pragma unroll
    for (int c = 0; c < C; ++c) terms[32 * c + lane] = abs[c] * abs[c];
    __syncwarp();
    const double norm2 = __shfl_sync(kFull, lane == 0 ? ordered_sum(terms, d) : 0.0, 0);
    return static_cast<float>(norm2 / xe);
}

/// Grid (token tiles of kRbTile, units); C = d / 32 registers per lane; `staged`: the largest
/// cluster count whose centroids the dynamic shared memory holds after the warps' regions.
template <int C>
__global__ void __launch_bounds__(kRbWarps * 32, C <= 4 ? 2 : 1)
    rabitq_encode_keys_kernel(const EncodeParams<dev::RaBitQDevice> a, int staged) {
    extern __shared__ __align__(16) uint8_t rb_smem[];
    const int lane = static_cast<int>(threadIdx.x) & 31, w = static_cast<int>(threadIdx.x) >> 5;
    const int u = static_cast<int>(blockIdx.y), first = static_cast<int>(blockIdx.x) * kRbTile;
    const dev::RaBitQDevice::Params& p = a.key_params(u);
    const int d = p.d, m = 1 << (p.bits - 1);
    const RbWarpLayout L = RbWarpLayout::of(p);
    uint8_t* mine = rb_smem + w * L.bytes;
    auto* dbl = reinterpret_cast<double*>(mine);
    auto* abs_e = reinterpret_cast<double*>(mine + L.abs_e);
    auto* cursor = reinterpret_cast<int*>(mine + L.cursor);
    auto* words = reinterpret_cast<uint32_t*>(mine + L.words);
    auto* tags = reinterpret_cast<uint16_t*>(mine + L.tags);
    const float* rows = p.centroids;
    int stride = d;
    const bool by_dot = p.clusters <= staged;  // rb_nearest_by_dot reads the staged norms
    __shared__ float max_norm2;
    if (by_dot) {
        auto* staged_rows = reinterpret_cast<float*>(rb_smem + kRbWarps * L.bytes);
        for (int i = static_cast<int>(threadIdx.x); i < p.clusters * d; i += kRbWarps * 32)
            staged_rows[(i / d) * (d + kRbRowPad) + i % d] = p.centroids[i];
        if (threadIdx.x == 0) max_norm2 = 0.0f;
        __syncthreads();
        rb_centroid_norms(staged_rows, d + kRbRowPad, p.clusters, d, &max_norm2);
        __syncthreads();
        rows = staged_rows;
        stride = d + kRbRowPad;
    }
    const HeadRegions R = a.store.regions[a.head(u)];
    const int code_bytes = static_cast<int>(R.key_code_bytes);
    const int last = min(first + kRbTile, a.n);
    for (int t = first + w; t < last; t += kRbWarps) {
        const float* src = a.keys + (static_cast<size_t>(u) * a.n + t) * d;
        float y[C];
#pragma unroll
        for (int c = 0; c < C; ++c) y[c] = src[32 * c + lane] * p.rotation.signs[32 * c + lane];
        warp_fwht_butterflies<C>(y, d, lane);
        const float scale = 1.0f / sqrtf(static_cast<float>(d));
        auto* x = reinterpret_cast<float*>(dbl);
        float x_norm2 = 0.0f;
#pragma unroll
        for (int c = 0; c < C; ++c) {
            y[c] *= scale;
            x[32 * c + lane] = y[c];
            x_norm2 += y[c] * y[c];
        }
        __syncwarp();
        int cid = -1;
        if (by_dot)
            cid = rb_nearest_by_dot(x, rows, stride, p.clusters, d, warp_sum(x_norm2), max_norm2,
                                    lane);
        if (cid < 0) cid = rb_nearest(x, rows, stride, p.clusters, d, lane);
        __syncwarp();  // x is read
        const float* cent = rows + static_cast<size_t>(cid) * stride;
        double abs[C];  // |e_j|, and bit c of `below` for e_j below 0
        unsigned below = 0;
        int low = INT_MAX;
        double norm2 = 0.0;  // ||e||^2 as a tree: rb_scale rounds f from it
#pragma unroll
        for (int c = 0; c < C; ++c) {
            const int j = 32 * c + lane;
            const double e = static_cast<double>(y[c]) - cent[j];
            abs[c] = fabs(e);
            if (!(e >= 0.0)) below |= 1u << c;
            low = min(low, rb_lowest_bit(abs[c]));
            norm2 += abs[c] * abs[c];
            abs_e[j] = abs[c];
        }
        low = rb_warp_min(low);
        norm2 = warp_sum(norm2);
        __syncwarp();
        const double abs_sum = rb_term_sum<C>(abs, abs_e, d, lane);
        int best_len = 0;
        if (norm2 > 0.0 && m > 1) {
            // The optimum's t is at most (M - 1/2) d / ||e||_1 (rabitq.cpp).
            const double t_max = (m - 0.5) * d / abs_sum * (1.0 + 1e-9);
            const int n =
                rb_sorted_events<C>(abs, abs_e, m, t_max,
                                    reinterpret_cast<unsigned long long*>(dbl), tags, cursor, lane);
            best_len = rb_best_prefix_warp(abs_e, tags, dbl, n, d, m, abs_sum, low, lane);
            if (best_len < 0)
                best_len = __shfl_sync(
                    kFull, lane == 0 ? rb_best_prefix(abs_e, tags, n, d, abs_sum) : 0, 0);
        }
        // steps_j: the count of j's events in the best prefix (its last one's s).
        for (int j = lane; j < d; j += 32) cursor[j] = 0;
        for (int i = lane; i < (code_bytes + 3) / 4; i += 32) words[i] = 0;
        __syncwarp();
        for (int i = lane; i < best_len; i += 32)
            atomicMax(cursor + (tags[i] >> 8), tags[i] & 0xff);
        __syncwarp();
        const int id_bits = 8 * p.id_bytes;
        double terms[C];
#pragma unroll
        for (int c = 0; c < C; ++c) {
            const int j = 32 * c + lane, s = cursor[j];
            terms[c] = (s + 0.5) * abs[c];  // the terms of <x_bar, e>
            dbl[j] = terms[c];
            const auto level = static_cast<uint32_t>((below >> c & 1) == 0 ? m + s : m - 1 - s);
            const int bit = id_bits + j * p.bits, word = bit >> 5, shift = bit & 31;
            atomicOr(words + word, level << shift);
            if (shift + p.bits > 32) atomicOr(words + word + 1, level >> (32 - shift));
        }
        if (lane == 0)
            atomicOr(words, static_cast<uint32_t>(cid) & (p.id_bytes == 2 ? 0xffffu : 0xffu));
        __syncwarp();
        const double xe = rb_term_sum<C>(terms, dbl, d, lane);
        const float f = norm2 > 0.0 ? rb_scale<C>(norm2, xe, abs, dbl, d, lane) : 0.0f;
        const int pos = a.pos(u, t), slot = pos % kPage;
        uint8_t* page = a.page(u, pos);
        uint8_t* code = page + R.key_codes + slot * code_bytes;
        const auto* bytes = reinterpret_cast<const uint8_t*>(words);  // little-endian words
        for (int b = lane; b < code_bytes; b += 32) code[b] = bytes[b];
        // e = 0 (a key on its centroid) decodes to c exactly.
        if (lane == 0) reinterpret_cast<float*>(page + R.key_scalars)[slot] = f;
        __syncwarp();  // the next token reuses this warp's shared memory
    }
}

template <>
struct BulkKeyEncoder<dev::RaBitQDevice> {
    static constexpr bool kAvailable = true;
    // A decode step's token in one warp beats a team of 128 threads: a rabitq step's append
    // (8 heads) 0.090 -> 0.057 ms (cuda_h200_20261202x_short_appends_run4.txt).
    static constexpr bool kShortAppends = true;
    /// A Hadamard rotation of 32, 64, 128 or 256 coordinates (a power of two: kernel() picks
    /// d / 32 registers a lane) and at most kRbMaxEvents critical values a token, the warps'
    /// regions within the device's shared memory.
    static bool usable(const dev::RaBitQDevice::Params& p, size_t smem_optin) {
        return p.rotation.hadamard && p.d >= 32 && p.d <= dev::kMaxDim && (p.d & (p.d - 1)) == 0 &&
               RbWarpLayout::of(p).events <= kRbMaxEvents &&
               rabitq_warps_smem_bytes(p) <= smem_optin;
    }
    static const void* kernel(const dev::RaBitQDevice::Params& p) {
        switch (p.d / 32) {
            case 1:
                return reinterpret_cast<const void*>(&rabitq_encode_keys_kernel<1>);
            case 2:
                return reinterpret_cast<const void*>(&rabitq_encode_keys_kernel<2>);
            case 4:
                return reinterpret_cast<const void*>(&rabitq_encode_keys_kernel<4>);
            default:
                return reinterpret_cast<const void*>(&rabitq_encode_keys_kernel<8>);
        }
    }
    /// The centroids are staged for up to any_head's cluster count (every head of a cache has
    /// the configured count once trained; a kin sequence's codec with more reads them from
    /// global memory), where the device's shared memory holds them.
    static void launch(const EncodeParams<dev::RaBitQDevice>& a,
                       const dev::RaBitQDevice::Params& any_head, int, cudaStream_t stream) {
        std::size_t optin = 0;
        check_cuda(shared_memory_optin(optin), "rabitq encode shared memory limit");
        const size_t warps = rabitq_warps_smem_bytes(any_head);
        const size_t centroids = rabitq_centroid_smem_bytes(any_head.clusters, any_head.d);
        const bool stage = warps + centroids <= optin;
        const int smem = static_cast<int>(stage ? warps + centroids : warps);
        const void* k = kernel(any_head);
        check_cuda(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
                   "rabitq encode shared memory");
        int staged = stage ? any_head.clusters : 0;
        const dim3 grid(static_cast<unsigned>((a.n + kRbTile - 1) / kRbTile),
                        static_cast<unsigned>(a.units));
        void* args[] = {const_cast<EncodeParams<dev::RaBitQDevice>*>(&a), &staged};
        check_cuda(cudaLaunchKernel(k, grid, dim3(kRbWarps * 32), args, smem, stream),
                   "rabitq key encode kernel");
    }
};

}  // namespace veloxquant::cuda::codec
