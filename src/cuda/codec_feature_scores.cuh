// The generic attention's scores on tensor cores, for the key codecs whose score is a factor of
// the token times the dot product of the query state with features of its code alone:
//   score_r(t) = factor_t * sum_i f_i(code_t) state_r[i],   i < F = the codec's state_floats
//   turboquant_rvq  f_j = sum_s C_s[i_sj] (the stages' centroids), factor ||k||
//   qjl             f_i = +1 or -1 by bit i of sign(S k), factor ||k||
//   fp16            f_j = k_j (the stored halves), factor 1
// A warp decodes 16 tokens' features into an fp16 tile (fp16 keys are their own tile) and
// multiplies it by the rows' states with mma m16n8k16: A = the tile (16 tokens x 16 features,
// ldmatrix), B = a state block (16 features x 8 rows), fp32 accumulators. Each row's state is
// scaled by a power of 2 (exact) so that its largest entry is below 1, and split into an fp16
// high part and the fp16 rounding of the rest: the two mma of each block see ~22 bits of every
// entry, and the tile's features are exact in fp16 (signs, stored halves) or rounded once
// (turboquant's centroid sums, 11 bits as the CPU's fp16 tables).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/codec_value_mma.cuh"
#include "cuda/ptx_wrappers.cuh"
#include "cuda/warp_reduce.cuh"
#include "device_codecs/fp16_device.h"
#include "device_codecs/qjl_device.h"
#include "device_codecs/tq_device.h"

namespace veloxquant::cuda::codec {

constexpr int kScoreStride = 36;  // floats per row of a warp's scores [8][32] (+4: no conflicts)

/// Which key codecs score on tensor cores, and how their features come to the tile.
/// kAvailable: the codec has the form above; kInPlace: its staged code rows are the tile.
template <class Codec>
struct FeatureScore {
    static constexpr bool kAvailable = false;
    static constexpr bool kInPlace = false;
};

/// 8 floats as 8 halves (round to nearest).
__device__ __forceinline__ uint4 pack_halves(const float (&f)[8]) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const __half2 h = __floats2half2_rn(f[2 * k], f[2 * k + 1]);
        w[k] = *reinterpret_cast<const uint32_t*>(&h);
    }
    return uint4{w[0], w[1], w[2], w[3]};
}

template <>
struct FeatureScore<dev::TqDevice> {
    using Params = dev::TqDevice::Params;
    static constexpr bool kAvailable = true;
    static constexpr bool kInPlace = false;
    __device__ static int features(const Params& p) { return p.d; }
    __host__ __device__ static bool usable(const Params& p) { return p.d % 16 == 0 && p.bits <= 4; }
    __device__ static float factor(const float* scalars) { return scalars[0]; }

    /// The 16 tokens' features (rows `stride` bytes apart) into tile rows `ts` halves apart:
    /// lanes over (token, group of 8 coordinates), the stages' centroids (p.centroids, in shared
    /// memory) summed in the CPU's stage order.
    __device__ static void decode_tile(const Params& p, const uint8_t* rows, int stride,
                                       __half* tile, int ts, TileWalk walk) {
        switch (p.bits) {
            case 1:
                return decode<1>(p, rows, stride, tile, ts, walk);
            case 2:
                return decode<2>(p, rows, stride, tile, ts, walk);
            case 3:
                return decode<3>(p, rows, stride, tile, ts, walk);
            default:
                return decode<4>(p, rows, stride, tile, ts, walk);
        }
    }

private:
    template <int B>
    __device__ static void decode(const Params& p, const uint8_t* rows, int stride, __half* tile,
                                  int ts, TileWalk walk) {
        for (; walk.row < kTileTokens; walk.next()) {
            const uint8_t* code = rows + walk.row * stride;
            float f[8] = {};
            for (int s = 0; s < p.stages; ++s) {
                const float* c = p.centroids + (s << B);
                uint32_t idx[8];
                dev::read_group8<B>(code + s * p.stage_bytes, walk.unit, idx);
#pragma unroll
                for (int k = 0; k < 8; ++k) f[k] += c[idx[k]];
            }
            *reinterpret_cast<uint4*>(tile + walk.row * ts + 8 * walk.unit) = pack_halves(f);
        }
    }
};

template <>
struct FeatureScore<dev::QjlDevice> {
    using Params = dev::QjlDevice::Params;
    static constexpr bool kAvailable = true;
    static constexpr bool kInPlace = false;
    __device__ static int features(const Params& p) { return p.m; }
    __host__ __device__ static bool usable(const Params& p) { return p.m % 16 == 0; }
    __device__ static float factor(const float* scalars) { return scalars[0]; }

    /// Code byte g of a token -> its 8 signs (bit k set: +1, else -1; fp16 1.0 is 0x3c00 and
    /// -1.0 the same with the sign bit).
    __device__ static void decode_tile(const Params&, const uint8_t* rows, int stride,
                                       __half* tile, int ts, TileWalk walk) {
        for (; walk.row < kTileTokens; walk.next()) {
            const uint32_t inv = ~static_cast<uint32_t>(rows[walk.row * stride + walk.unit]);
            uint32_t w[4];
#pragma unroll
            for (int k = 0; k < 4; ++k)
                w[k] = 0x3c003c00u | ((inv >> (2 * k)) & 1u) << 15 |
                       ((inv >> (2 * k + 1)) & 1u) << 31;
            *reinterpret_cast<uint4*>(tile + walk.row * ts + 8 * walk.unit) =
                uint4{w[0], w[1], w[2], w[3]};
        }
    }
};

template <>
struct FeatureScore<dev::Fp16Device> {
    using Params = dev::Fp16Device::Params;
    static constexpr bool kAvailable = true;
    static constexpr bool kInPlace = true;  // value_stage_stride(2 d, 16) pads the staged rows
    __device__ static int features(const Params& p) { return p.d; }
    __host__ __device__ static bool usable(const Params& p) { return p.d % 16 == 0; }
    __device__ static float factor(const float*) { return 1.0f; }
};

/// Halves per row of a feature tile and of the fp16 states: S rounded up to 16, plus 8 (rows an
/// odd multiple of 16 bytes apart: ldmatrix's 8 rows in 8 bank groups).
__host__ __device__ constexpr int feature_stride(int state_stride) {
    return (state_stride + 15) / 16 * 16 + 8;
}

/// Bytes of a warp's feature tile, 16 tokens.
__host__ __device__ constexpr size_t feature_tile_bytes(int state_stride) {
    return kTileTokens * feature_stride(state_stride) * sizeof(__half);
}

/// Bytes of a CTA's fp16 states: high and low parts, [2][8][feature_stride(S)] halves, then the
/// rows' power-of-2 scales [8] floats and their exponents [8] ints.
__host__ __device__ constexpr size_t feature_states_bytes(int state_stride) {
    return 2 * kWeightRows * feature_stride(state_stride) * sizeof(__half) +
           kWeightRows * (sizeof(float) + sizeof(int));
}

/// Bytes of a warp's scores [8][kScoreStride] floats.
__host__ __device__ constexpr size_t scores_bytes() {
    return kWeightRows * kScoreStride * sizeof(float);
}

/// The fp16 states from the float states [S][R] (entry i of row r at i * R + r), by the CTA:
/// row r's entries times 2^-e_r, e_r the exponent of its largest |entry| (frexp), as high and
/// low halves; rows R .. 7 zero. row_scale[r] = 2^e_r, followed by the exponents (8 ints). The
/// caller synchronizes before they are read.
template <int R>
__device__ void prepare_feature_states(const float* states, int S, int F, __half* halves,
                                       float* row_scale) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int* exponent = reinterpret_cast<int*>(row_scale + kWeightRows);
    for (int r = warp; r < kWeightRows; r += warps) {
        float top = 0.0f;
        if (r < R)
            for (int i = lane; i < F; i += 32) top = fmaxf(top, fabsf(states[i * R + r]));
        top = warp_max(top);
        int e = 0;
        frexpf(top, &e);  // top = m 2^e, m in [0.5, 1) (e = 0 for top = 0)
        if (lane == 0) exponent[r] = e, row_scale[r] = ldexpf(1.0f, e);
    }
    __syncthreads();
    const int ts = feature_stride(S);
    for (int i = threadIdx.x; i < kWeightRows * ts; i += blockDim.x) {
        const int r = i / ts, k = i - r * ts;
        const float x = r < R && k < F ? ldexpf(states[k * R + r], -exponent[r]) : 0.0f;
        const __half hi = __float2half_rn(x);
        halves[i] = hi;
        halves[kWeightRows * ts + i] = __float2half_rn(x - __half2float(hi));
    }
}

/// Scores of 16 tokens (tile rows `ts` halves apart, F features) for the 8 state rows, written
/// unscaled to scores[r * kScoreStride + t0 + token].
__device__ __forceinline__ void tile_scores(const __half* tile, int ts, const __half* halves,
                                            int S, int F, float* scores, int t0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    // ldmatrix (not transposed): matrices (tokens 0-7 | 8-15) x (features +0 | +8) are the A
    // fragment's registers 0 .. 3; lane i gives row i % 8 of matrix i / 8.
    const __half* a_row = tile + ((lane & 7) + ((lane >> 3) & 1) * 8) * ts + (lane >> 4) * 8;
    const __half* hi = halves + g * feature_stride(S) + 2 * t;
    const __half* lo = hi + kWeightRows * feature_stride(S);
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < F; k0 += 16) {
        uint32_t a[4];
        ldmatrix_x4(a, a_row + k0);
        mma_16816(c, a, *reinterpret_cast<const uint32_t*>(hi + k0),
                  *reinterpret_cast<const uint32_t*>(hi + k0 + 8));
        mma_16816(c, a, *reinterpret_cast<const uint32_t*>(lo + k0),
                  *reinterpret_cast<const uint32_t*>(lo + k0 + 8));
    }
    // C: tokens g and g + 8, rows 2 t and 2 t + 1.
    scores[(2 * t) * kScoreStride + t0 + g] = c[0];
    scores[(2 * t + 1) * kScoreStride + t0 + g] = c[1];
    scores[(2 * t) * kScoreStride + t0 + g + 8] = c[2];
    scores[(2 * t + 1) * kScoreStride + t0 + g + 8] = c[3];
}

}  // namespace veloxquant::cuda::codec
