// The codeword searches of commvq's long-append key encoder (commvq_encode.cuh): the nearest of
// a slice's C codewords to a residual, bit for bit CommVQDevice::nearest (the codec's value
// v = norms2[c] + (-2 x_0) w_0 + (-2 x_1) w_1 + ..., each product rounded, summed in j order; the
// first index of the least; NaNs skipped; nothing taken: the last index).
//
// commvq_scan: one lane scans the codewords in order (about 21 instructions a codeword).
//
// commvq_nearest_tensor (group_dim 8, sm_80 and later): a warp's 32 residuals against every
// codeword on tensor cores, as the CPU's commvq_nearest_bounded does with fused multiply-adds
// (methods/commvq.cpp). f_c = norms2[c] + sum_j tf32(-2 x_j) tf32(w_j) by mma m16n8k8 (tokens as
// rows, codewords as columns) is within E1 of the exact sum, the codec's v_c within E2:
//   T = |norms2|max + sum_j |2 x_j| |w_j|max (the slice's bounds, CommVQCodec::search_bounds()),
//   tf32 rounding (cvt.rna, 2^-11 an operand) puts a product within 2^-10 of its value, a
//   truncating conversion within 2^-9; the f32 sums of 9 terms, in any order and with truncation,
//   within 9 * 2^-23 T; so E1 <= (2^-9 + 2^-19.8) T. E2 <= gamma_17 T (Higham, eq. 3.5).
//   Subnormal operands or products flushed to zero move f by at most 2^-126 (|2 x_j| + |w_j|)
//   each: the margin's absolute part.
// A codeword c whose v_c <= v_d (d: the least f) has f_c <= f_d + 2 (E1 + E2) <= f_d + 2^-7 T:
// every codeword that may hold the least v is a candidate, and the least (v, c) of the candidates
// (the codec's v, computed as commvq_scan does) is the codec's choice. The first pass takes each
// token's least f, the second marks the tiles holding candidates (1.5 codewords a search on
// Gaussian keys), then each lane computes v of its marked codewords and the quads combine them.
// Where the caller knows a codeword k of the slice (the ICM sweep's current one), v_k bounds the
// least v from above, so every codeword holding it has f_c <= v_c + E1 + E2 <= v_k + 2^-7 T: the
// cut comes from v_k, computed as the codec does, and the first pass is skipped.
// Tokens with T or |x_j| of 2^100 or more (f could overflow) take commvq_scan. Files that
// include this header compile with --fmad=false, as the device codecs.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/ptx_wrappers.cuh"
#include "device_codecs/device_common.h"

namespace veloxquant::cuda::codec {

/// The codec's value of codeword w (GD floats, 16-byte aligned) for x2 = -2 x: norms2 + x2_0 w_0
/// + x2_1 w_1 + ..., each product rounded, summed in j order.
template <int GD>
__device__ __forceinline__ float commvq_value(const float (&x2)[GD], const float* w, float norm2) {
    float wr[GD];
    dev::load_rows<GD>(w, wr);
    float v = norm2;
#pragma unroll
    for (int j = 0; j < GD; ++j) v += x2[j] * wr[j];
    return v;
}

/// scan_nearest's loop over the n codewords staged at words, norms2 (16-byte aligned), which are
/// codewords c0 .. c0 + n - 1. GD > 0: x in registers (gd = GD); GD = 0: x in shared memory.
/// Once a codeword is taken (*best >= 0, for good), scan_nearest's second test is false: from
/// there on the loop tests v < *m alone (3 instructions a codeword instead of 7).
template <int GD>
__device__ __forceinline__ void commvq_scan(const float* x, const float* words, const float* norms2,
                                            int c0, int n, int gd, float* m, int* best) {
    float x2[GD > 0 ? GD : 1];
#pragma unroll
    for (int j = 0; j < GD; ++j) x2[j] = -2.0f * x[j];
    const auto value = [&](int c) {
        float v = norms2[c];
        if constexpr (GD > 0) {
            v = commvq_value<GD>(x2, words + c * GD, v);
        } else {
            const float* w = words + c * gd;
            for (int j = 0; j < gd; ++j) v += -2.0f * x[j] * w[j];
        }
        return v;
    };
    int c = 0;
    for (; c < n && *best < 0; ++c) {
        const float v = value(c);
        if (v < *m) {
            *m = v;
            *best = c0 + c;
        } else if (*best < 0 && v == *m) {
            *best = c0 + c;
        }
    }
#pragma unroll(GD > 0 ? 4 : 1)
    for (; c < n; ++c) {
        const float v = value(c);
        if (v < *m) {
            *m = v;
            *best = c0 + c;
        }
    }
}

constexpr int kCvqTensorDim = 8;  // group_dim of the tensor search: the mma's k

/// A warp's shared memory for commvq_nearest_tensor: -2 x of its 32 tokens (exact: a power of
/// two), read as float4 rows.
struct alignas(16) CvqWarpRows {
    float x2[32][kCvqTensorDim];
};
static_assert(sizeof(CvqWarpRows) == 32 * kCvqTensorDim * 4, "CvqWarpRows: no padding");

/// Bytes of the B fragments of a slice of C codewords (C / 8 column tiles x 32 lanes x uint2)
/// and of its norms as accumulators (C / 8 tiles x 4 lane columns x float4).
__host__ __device__ constexpr int cvq_fragment_bytes(int C) {
    return C / 8 * 32 * 8 + C / 8 * 4 * 16;
}

/// The 16 bytes at shared address p into c (ld.shared.v4 that the compiler keeps: each
/// accumulator tile loads its own copy instead of moving one load's registers).
__device__ __forceinline__ void lds128(float (&c)[4], const float4* p) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    asm volatile("ld.shared.v4.f32 {%0,%1,%2,%3}, [%4];\n"
                 : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
                 : "r"(a));
}

/// Stages a slice (global words [C][8] and norms2 [C], 16-byte aligned; its 1 + 8 search bounds)
/// for commvq_nearest_tensor, by the CTA's threads tid of nt: the words and norms copied, the
/// bounds, the B fragments (lane 4 g + t of column tile n holds tf32(w_{8 n + g}[t]),
/// tf32(w_{8 n + g}[t + 4])) at frag, and at frag + C * 4 the norms as accumulators (entry
/// 4 n + t: norms2[8 n + 2 t], norms2[8 n + 2 t + 1], twice), one thread a codeword.
__device__ __forceinline__ void cvq_stage_tensor_slice(const float* g_words, const float* g_norms2,
                                                       const float* g_bound, int C, float* words,
                                                       float* norms2, uint2* frag, float* bound,
                                                       int tid, int nt) {
    auto* norm_acc = reinterpret_cast<float4*>(frag + C * 4);
    for (int c = tid; c < C; c += nt) {
        const float4 lo = reinterpret_cast<const float4*>(g_words)[2 * c];
        const float4 hi = reinterpret_cast<const float4*>(g_words)[2 * c + 1];
        reinterpret_cast<float4*>(words)[2 * c] = lo;
        reinterpret_cast<float4*>(words)[2 * c + 1] = hi;
        norms2[c] = g_norms2[c];
        uint2* f = frag + (c >> 3) * 32 + (c & 7) * 4;
        f[0] = make_uint2(to_tf32(lo.x), to_tf32(hi.x));
        f[1] = make_uint2(to_tf32(lo.y), to_tf32(hi.y));
        f[2] = make_uint2(to_tf32(lo.z), to_tf32(hi.z));
        f[3] = make_uint2(to_tf32(lo.w), to_tf32(hi.w));
        if ((c & 1) == 0)
            norm_acc[c >> 1] =
                make_float4(g_norms2[c], g_norms2[c + 1], g_norms2[c], g_norms2[c + 1]);
    }
    if (tid <= kCvqTensorDim) bound[tid] = g_bound[tid];
}

/// The nearest of C (a multiple of 8, <= 256) codewords to x (this lane's residual; inactive
/// lanes pass active = false and get -1), every lane of the warp calling together, on a slice
/// staged by cvq_stage_tensor_slice. known: a codeword of the slice (its value bounds the
/// search: the first pass is skipped where every active lane of the warp gives one) or -1.
/// *scanned (where given) tells whether the lane took commvq_scan.
__device__ __forceinline__ int commvq_nearest_tensor(const float (&x)[kCvqTensorDim], bool active,
                                                     int known, const float* words,
                                                     const float* norms2, const uint2* frag,
                                                     const float* bound, int C, CvqWarpRows& s,
                                                     bool* scanned = nullptr) {
    const int lane = lane_id(), g = lane >> 2, t = lane & 3, tiles = C / 8;
    float x2[kCvqTensorDim];
    float T = bound[0], absolute = 1.0f, largest = 0.0f;
#pragma unroll
    for (int j = 0; j < kCvqTensorDim; ++j) {
        x2[j] = -2.0f * x[j];
        const float a = fabsf(x2[j]);
        T += a * bound[1 + j];
        absolute += a + bound[1 + j];
        largest = fmaxf(largest, a);
    }
    const bool bounded = active && T < 0x1p100f && largest < 0x1p100f;
    const float margin = bounded ? T * 0x1p-7f + absolute * 0x1p-100f : -INFINITY;
    __syncwarp();  // the warp's previous search has read the rows
    reinterpret_cast<float4*>(s.x2[lane])[0] = make_float4(x2[0], x2[1], x2[2], x2[3]);
    reinterpret_cast<float4*>(s.x2[lane])[1] = make_float4(x2[4], x2[5], x2[6], x2[7]);
    __syncwarp();
    uint32_t a[2][4];  // rows: tokens 16 m .. 16 m + 15
#pragma unroll
    for (int m = 0; m < 2; ++m) {
        a[m][0] = to_tf32(s.x2[16 * m + g][t]);
        a[m][1] = to_tf32(s.x2[16 * m + g + 8][t]);
        a[m][2] = to_tf32(s.x2[16 * m + g][t + 4]);
        a[m][3] = to_tf32(s.x2[16 * m + g + 8][t + 4]);
    }
    // Slot k of a lane: token 16 (k / 2) + g + 8 (k % 2); accumulators 2 h, 2 h + 1 of tile m are
    // slot 2 m + h's codewords 8 n + 2 t and 8 n + 2 t + 1. tile_least: tile n's least f of each
    // slot's two codewords.
    const auto* norm_acc = reinterpret_cast<const float4*>(frag + C * 4);
    const auto tile_least = [&](int n, float(&least)[4]) {
        const uint2 b = frag[n * 32 + lane];
        float f[2][4];
#pragma unroll
        for (int m = 0; m < 2; ++m) {
            lds128(f[m], norm_acc + 4 * n + t);
            mma_1688_tf32(f[m], a[m], b.x, b.y);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k)
            least[k] = fminf(f[k >> 1][2 * (k & 1)], f[k >> 1][2 * (k & 1) + 1]);
    };
    float cut[4];
    if (__all_sync(0xffffffffu, known >= 0 || !active)) {
        // The known codeword's value, as the codec computes it.
        const float own = __fadd_ru(
            active ? commvq_value<kCvqTensorDim>(x2, words + known * kCvqTensorDim, norms2[known])
                   : 0.0f,
            margin);
#pragma unroll
        for (int k = 0; k < 4; ++k)
            cut[k] = __shfl_sync(0xffffffffu, own, 16 * (k >> 1) + g + 8 * (k & 1));
    } else {
        float least[4] = {INFINITY, INFINITY, INFINITY, INFINITY};
#pragma unroll 4
        for (int n = 0; n < tiles; ++n) {
            float tl[4];
            tile_least(n, tl);
#pragma unroll
            for (int k = 0; k < 4; ++k) least[k] = fminf(least[k], tl[k]);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            least[k] = fminf(least[k], __shfl_xor_sync(0xffffffffu, least[k], 1));
            least[k] = fminf(least[k], __shfl_xor_sync(0xffffffffu, least[k], 2));
            const int token = 16 * (k >> 1) + g + 8 * (k & 1);
            cut[k] = __fadd_ru(least[k], __shfl_sync(0xffffffffu, margin, token));
        }
    }
    // Second pass: per slot a bit per tile (tile n at bit tiles - 1 - n) where either codeword
    // is a candidate; both then get the codec's value (a superset of the candidates is fine).
    // tl <= cut is the sign of tl - cut rounded down (equal: -0). A NaN difference may set the
    // bit or not: a NaN tl holds no candidate, and a NaN cut (a NaN known value) marks every
    // tile or none, where the exact values or the lane's scan decide.
    uint32_t marks[4] = {0, 0, 0, 0};
#pragma unroll 4
    for (int n = 0; n < tiles; ++n) {
        float tl[4];
        tile_least(n, tl);
#pragma unroll
        for (int k = 0; k < 4; ++k)
            marks[k] = __funnelshift_l(__float_as_uint(__fsub_rd(tl[k], cut[k])), marks[k], 1);
    }
    int mine = -1;  // this lane's token's codeword
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int token = 16 * (k >> 1) + g + 8 * (k & 1);
        float bv = INFINITY;
        int bc = -1;
        for (uint32_t mk = marks[k]; mk != 0; mk &= mk - 1) {
            const int n = tiles - 1 - (__ffs(mk) - 1);
            float y[kCvqTensorDim];
            dev::load_rows<kCvqTensorDim>(s.x2[token], y);
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int c = 8 * n + 2 * t + e;
                const float v =
                    commvq_value<kCvqTensorDim>(y, words + c * kCvqTensorDim, norms2[c]);
                if (v < bv || (v == bv && c < bc)) bv = v, bc = c;
            }
        }
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {  // the quad's least (v, c); -1 last
            const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
            const int oc = __shfl_xor_sync(0xffffffffu, bc, off);
            if (ov < bv || (ov == bv && static_cast<unsigned>(oc) < static_cast<unsigned>(bc)))
                bv = ov, bc = oc;
        }
        const int c = __shfl_sync(0xffffffffu, bc, 4 * (lane & 7));
        if (k == 2 * (lane >> 4) + ((lane >> 3) & 1)) mine = c;
    }
    const bool certain = bounded && mine >= 0;
    if (scanned != nullptr) *scanned = active && !certain;
    if (certain) return mine;
    if (!active) return -1;
    float m = INFINITY;
    int best = -1;
    commvq_scan<kCvqTensorDim>(x, words, norms2, 0, C, kCvqTensorDim, &m, &best);
    return best < 0 ? C - 1 : best;
}

}  // namespace veloxquant::cuda::codec
