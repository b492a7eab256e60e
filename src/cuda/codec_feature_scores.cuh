// The generic attention's scores on tensor cores, for the key codecs that name the feature form
// of their score (src/device_codecs/device_common.h, HasFeatures):
//     score_r(t) = state_r[extra_t] + factor_t * sum_{i < F} f_i(code_t, pos_t) state_r[offset + i]
// fp16 (the stored halves, read in place) and qjl (the sketch bits' signs). A warp decodes 16
// tokens' features into an fp16 tile and multiplies it by the rows' states with mma m16n8k16:
// A = the tile (16 tokens x 16 features, ldmatrix), B = a state block (16 features x 8 rows),
// fp32 accumulators. Each row's state is scaled by a power of 2 (exact) so that its largest entry
// is below 1, and split into an fp16 high part and the fp16 rounding of the rest: the two mma of
// each block see ~22 bits of every entry; signs and stored halves are exact in fp16.
// The other codecs have the form too, but on the H200 their features cost more to decode into the
// tile than their lane scores at so few rows (bench_codec_cache at 32K tokens, d=128, 8/32 heads:
// turboquant k4v4 0.092 -> 0.158 ms a decode step, polarquant 0.116 -> 0.224, spectral 0.136 ->
// 0.393; fp16 0.121 -> 0.079; qjl decode 0.117 -> 0.118 and prefill chunks 27.8 -> 19.0 ms;
// bench/results/cuda_h200_20261201n_generic_ab.txt), so these kernels score them lane by lane
// (codec_backend.cu's kFewRowFeatures); their features serve the wide prefill (codec_prefill.cuh).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/codec_value_mma.cuh"
#include "cuda/ptx_wrappers.cuh"
#include "cuda/warp_reduce.cuh"
#include "device_codecs/device_common.h"

namespace veloxquant::cuda::codec {

constexpr int kScoreStride = 36;  // floats per row of a warp's scores [8][32] (+4: no conflicts)

/// How a launch scores (StageSizes::features): lane by lane, from a decoded feature tile, or
/// from the staged codes in place (kFeaturesInPlace, F a multiple of 16).
enum FeatureMode : int { kLaneScores = 0, kFeatureTile = 1, kFeaturesInPlace = 2 };

template <class Codec, class = void>
struct InPlaceFeatures : std::false_type {};
template <class Codec>
struct InPlaceFeatures<Codec, std::void_t<decltype(Codec::kFeaturesInPlace)>>
    : std::bool_constant<Codec::kFeaturesInPlace> {};

/// 8 floats as 8 halves (round to nearest).
__device__ __forceinline__ uint4 pack_halves(const float* f) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const __half2 h = __floats2half2_rn(f[2 * k], f[2 * k + 1]);
        w[k] = *reinterpret_cast<const uint32_t*>(&h);
    }
    return uint4{w[0], w[1], w[2], w[3]};
}

template <class Codec, bool = dev::HasFeatures<Codec>::value>
struct FeatureScore {
    static constexpr bool kAvailable = false;
};

template <class Codec>
struct FeatureScore<Codec, true> {
    using Params = typename Codec::Params;
    static constexpr bool kAvailable = true;
    static constexpr int kGroup = Codec::kFeatureGroup;
    /// Whether the features are exact in fp16 (dev::ExactHalfFeatures); otherwise the wide
    /// prefill kernel takes them as high and low halves.
    static constexpr bool kExactHalves = dev::ExactHalfFeatures<Codec>::value;
    static_assert(kGroup == 8 || kGroup == 16, "features come in groups of 8 or 16");

    /// F rounded up to the mma's 16 (the features and states past F are zero).
    __host__ __device__ static int padded(const Params& p) {
        return (Codec::feature_count(p) + 15) / 16 * 16;
    }
    /// The mode these Params allow (the launcher's choice before shared memory is counted).
    __host__ __device__ static FeatureMode mode(const Params& p) {
        if (!Codec::features_usable(p)) return kLaneScores;
        return InPlaceFeatures<Codec>::value && Codec::feature_count(p) % 16 == 0 ? kFeaturesInPlace
                                                                                  : kFeatureTile;
    }

    /// walk.rows (16) tokens' features (rows `stride` bytes apart, positions pos0, pos0 + 1, ...)
    /// into tile rows `ts` halves apart, lanes over (token, group); groups past F are zeros.
    /// walk: TileWalk(padded(p) / kGroup, lane). With `low` (a tile of the same layout), the
    /// features' fp16 rounding goes to `tile` and the fp16 rounding of the rest to `low`.
    __device__ static void decode_tile(const Params& p, const uint8_t* rows, int stride, int pos0,
                                       __half* tile, int ts, TileWalk walk, __half* low = nullptr) {
        const int F = Codec::feature_count(p);
        for (; walk.row < walk.rows; walk.next()) {
            float f[kGroup];
            const int first = walk.unit * kGroup;
            if (first < F)
                Codec::features(p, rows + walk.row * stride, pos0 + walk.row, walk.unit, f);
#pragma unroll
            for (int k = 0; k < kGroup; ++k)
                if (first + k >= F) f[k] = 0.0f;
            uint4* dst = reinterpret_cast<uint4*>(tile + walk.row * ts + first);
#pragma unroll
            for (int k = 0; k < kGroup / 8; ++k) dst[k] = pack_halves(f + 8 * k);
            if (low == nullptr) continue;
#pragma unroll
            for (int k = 0; k < kGroup; ++k) f[k] -= __half2float(__float2half_rn(f[k]));
            uint4* rest = reinterpret_cast<uint4*>(low + walk.row * ts + first);
#pragma unroll
            for (int k = 0; k < kGroup / 8; ++k) rest[k] = pack_halves(f + 8 * k);
        }
    }
};

/// Halves per row of a feature tile and of the fp16 states: the feature span (StageSizes) rounded
/// up to 16, plus 8 (rows an odd multiple of 16 bytes apart: ldmatrix's 8 rows in 8 bank groups).
__host__ __device__ constexpr int feature_stride(int feature_span) {
    return (feature_span + 15) / 16 * 16 + 8;
}

/// Bytes of a warp's feature tile, 16 tokens.
__host__ __device__ constexpr size_t feature_tile_bytes(int feature_span) {
    return kTileTokens * feature_stride(feature_span) * sizeof(__half);
}

/// Bytes of a CTA's fp16 states: high and low parts, [2][8][feature_stride(span)] halves, then
/// the rows' power-of-2 scales [8] floats and their exponents [8] ints.
__host__ __device__ constexpr size_t feature_states_bytes(int feature_span) {
    return 2 * kWeightRows * feature_stride(feature_span) * sizeof(__half) +
           kWeightRows * (sizeof(float) + sizeof(int));
}

/// Bytes of a warp's scores [8][kScoreStride] floats.
__host__ __device__ constexpr size_t scores_bytes() {
    return kWeightRows * kScoreStride * sizeof(float);
}

/// The fp16 states, rows feature_stride(span) halves apart, from the float states [S][R] (entry
/// i of row r at i * R + r; features against entries offset .. offset + F - 1 < span), by the
/// CTA: row r's entries times 2^-e_r, e_r the
/// exponent of its largest |entry| (frexp), as high and low halves; rows R .. 7 zero. row_scale[r]
/// = 2^e_r, followed by the exponents (8 ints). The caller synchronizes before they are read.
template <int R>
__device__ void prepare_feature_states(const float* states, int span, int offset, int F,
                                       __half* halves, float* row_scale) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int* exponent = reinterpret_cast<int*>(row_scale + kWeightRows);
    for (int r = warp; r < kWeightRows; r += warps) {
        float top = 0.0f;
        if (r < R)
            for (int i = lane; i < F; i += 32)
                top = fmaxf(top, fabsf(states[(offset + i) * R + r]));
        top = warp_max(top);
        int e = 0;
        frexpf(top, &e);  // top = m 2^e, m in [0.5, 1) (e = 0 for top = 0)
        if (lane == 0) exponent[r] = e, row_scale[r] = ldexpf(1.0f, e);
    }
    __syncthreads();
    const int ts = feature_stride(span);
    for (int i = threadIdx.x; i < kWeightRows * ts; i += blockDim.x) {
        const int r = i / ts, k = i - r * ts;
        const float x = r < R && k < F ? ldexpf(states[(offset + k) * R + r], -exponent[r]) : 0.0f;
        const __half hi = __float2half_rn(x);
        halves[i] = hi;
        halves[kWeightRows * ts + i] = __float2half_rn(x - __half2float(hi));
    }
}

/// Scores of 16 tokens (tile rows `ts` halves apart, F features: a multiple of 16) for the 8
/// state rows (prepare_feature_states' halves of that span), written unscaled to
/// scores[r * kScoreStride + t0 + token].
__device__ __forceinline__ void tile_scores(const __half* tile, int ts, const __half* halves,
                                            int span, int F, float* scores, int t0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    // ldmatrix (not transposed): matrices (tokens 0-7 | 8-15) x (features +0 | +8) are the A
    // fragment's registers 0 .. 3; lane i gives row i % 8 of matrix i / 8.
    const __half* a_row = tile + ((lane & 7) + ((lane >> 3) & 1) * 8) * ts + (lane >> 4) * 8;
    const __half* hi = halves + g * feature_stride(span) + 2 * t;
    const __half* lo = hi + kWeightRows * feature_stride(span);
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < F; k0 += 16) {
        uint32_t a[4];
        ldmatrix_x4<false>(a, a_row + k0);
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
