// The nearest centroid of a point by a whole warp, bit for bit the CPU's nearest_centroid
// (core/kmeans.h): the rabitq encoder's exact search (rabitq_encode.cuh) and the device
// k-means' assignment (kmeans_device.cu). Compile with --fmad=false: the distances are
// squared_distance's float operations.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/warp_reduce.cuh"

namespace veloxquant::cuda::codec {

// Staged centroid rows are d + kRbRowPad floats apart: 16-byte loads by 8 lanes (one phase of a
// 128-bit shared load) of rows 4 (mod 32) banks apart touch distinct banks. The pad's first float
// holds the row's squared norm (rb_centroid_norms).
constexpr int kRbRowPad = 4;

/// Adds squared_distance's terms of coordinates j0 .. j0 + 7 (its eight partial sums, the same
/// float operations) for rows r0 and r1, from 16-byte loads.
__device__ __forceinline__ void rb_distance_terms(const float4* x, const float4* r0,
                                                  const float4* r1, float (&p0)[8],
                                                  float (&p1)[8]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float4 xv = x[h], a = r0[h], b = r1[h];
        const float xs[4] = {xv.x, xv.y, xv.z, xv.w}, as[4] = {a.x, a.y, a.z, a.w},
                    bs[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            const float t0 = xs[l] - as[l], t1 = xs[l] - bs[l];
            p0[4 * h + l] += t0 * t0;
            p1[4 * h + l] += t1 * t1;
        }
    }
}

/// nearest_centroid over the rows at `rows` (stride floats apart, a multiple of 4; rows and x
/// 16-byte aligned; d a multiple of 8): the first least distance, NaN never taken except
/// centroid 0's, which then stays (keyed -inf: nothing is below it). Each lane scores centroids
/// c and c + 32 together (c = lane, lane + 64, ...), x read once for both; the distances are
/// squared_distance's bit for bit.
__device__ inline int rb_nearest(const float* x, const float* rows, int stride, int clusters, int d,
                                 int lane) {
    float v = 0.0f;
    int best = -1;
    auto keep = [&](float dd, int c) {  // c ascends in this lane
        if (dd != dd) {
            if (c != 0) return;
            dd = -INFINITY;
        }
        if (best < 0 || dd < v) {
            v = dd;
            best = c;
        }
    };
    for (int c = lane; c < clusters; c += 64) {
        const int c1 = min(c + 32, clusters - 1);  // past the last: scored, not kept
        const auto* r0 = reinterpret_cast<const float4*>(rows + static_cast<size_t>(c) * stride);
        const auto* r1 = reinterpret_cast<const float4*>(rows + static_cast<size_t>(c1) * stride);
        const auto* xv = reinterpret_cast<const float4*>(x);
        float p0[8] = {}, p1[8] = {};
        for (int q = 0; q < d / 4; q += 2) rb_distance_terms(xv + q, r0 + q, r1 + q, p0, p1);
        float d0 = 0.0f, d1 = 0.0f;
#pragma unroll
        for (int l = 0; l < 8; ++l) {
            d0 += p0[l];
            d1 += p1[l];
        }
        keep(d0, c);
        if (c + 32 < clusters) keep(d1, c + 32);
    }
    for (int offset = 16; offset > 0; offset >>= 1) {  // least (v, index): a total order
        const float v2 = __shfl_xor_sync(kFull, v, offset);
        const int i2 = __shfl_xor_sync(kFull, best, offset);
        if (i2 >= 0 && (best < 0 || v2 < v || (v2 == v && i2 < best))) {
            v = v2;
            best = i2;
        }
    }
    return best < 0 ? 0 : best;
}

}  // namespace veloxquant::cuda::codec
