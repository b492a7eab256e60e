// Shared memory of the generic attention kernel (codec_attention_kernel), computed alike by the
// launcher (its size) and the kernel (its regions):
//   CTA:  the R rows' float states [S][R] | the codecs' tables | fp16 states (feature scores)
//   warp: staged key codes | feature tile | staged value codes | key scalars | value scalars |
//         weights [8][40] halves | scores [8][36] floats (feature scores)
// The feature regions are there only where the launcher chose tensor-core scores (they grow
// with the state: qjl's sketch). The value tile lies over the staged keys (scored by then)
// unless the key codec decodes a feature tile, whose region it then shares; once the token loop
// ends, each warp's area holds its (m, l, o[D]) per row for the combine.
#pragma once

#include <cstddef>

#include "cuda/codec_feature_scores.cuh"
#include "cuda/codec_value_mma.cuh"

namespace veloxquant::cuda::codec {

/// Staged value bytes per token: rounded up to 16 bytes, which lets the copy move 16 bytes at a
/// time; rows of halves then to an odd multiple of 16, as ldmatrix reads them in place (8 rows
/// in 8 different bank groups). Also the staged key stride of fp16 keys (InPlaceFeatures).
__host__ __device__ constexpr int half_rows_stride(int bytes, bool halves) {
    return halves && (bytes + 15) / 16 % 2 == 0 ? (bytes + 15) / 16 * 16 + 16
                                                : (bytes + 15) / 16 * 16;
}

/// Shared memory of the codecs' tables: the key codec's, then the value table
/// (codec_value_mma.cuh) at a 16-byte boundary.
__host__ __device__ constexpr int tables_floats(int key_table_floats, int value_table_floats) {
    return (key_table_floats + 3) / 4 * 4 + value_table_floats;
}

/// What sizes the layout: a launch's strides and counts (AttentionParams' fields).
struct StageSizes {
    int state_stride = 0;                  ///< floats per row of the query state (a multiple of 4)
    int table_floats = 0;                  ///< tables_floats(key, value)
    int key_stride = 0, value_stride = 0;  ///< staged bytes per token
    int key_scalars = 0, value_scalars = 0;  ///< staged scalars per token
    int features = kLaneScores;              ///< FeatureMode: the launcher's choice (FeatureScore)
    /// Floats at the start of a row's state that features read (the codec's own state: a centred
    /// launch's W after it is not a feature), the width of the fp16 states and feature tiles.
    int feature_span = 0;
};

/// Byte offsets: CTA regions from the dynamic shared memory's start, warp regions from the
/// warp's area (warps + warp * area).
struct AttentionLayout {
    size_t tables = 0, feature_states = 0, warps = 0, area = 0, total = 0;
    size_t tile = 0, values = 0, key_scalars = 0, value_scalars = 0, weights = 0, scores = 0;
};

__host__ __device__ constexpr size_t round16(size_t bytes) {
    return (bytes + 15) / 16 * 16;
}

template <class Codec>
__host__ __device__ constexpr AttentionLayout attention_layout(int R, int D, const StageSizes& z,
                                                               int warps) {
    const bool features = FeatureScore<Codec>::kAvailable && z.features != kLaneScores;
    const bool feature_tile = features && z.features == kFeatureTile;
    AttentionLayout L;
    L.tables = round16(static_cast<size_t>(R) * z.state_stride * sizeof(float));
    L.feature_states = L.tables + round16(z.table_floats * sizeof(float));
    L.warps = L.feature_states + (features ? round16(feature_states_bytes(z.feature_span)) : 0);
    const size_t keys = round16(32 * static_cast<size_t>(z.key_stride));
    const size_t tile = feature_tile && feature_tile_bytes(z.feature_span) > tile_bytes(D)
                            ? feature_tile_bytes(z.feature_span)
                            : tile_bytes(D);
    L.tile = feature_tile ? keys : 0;
    L.values = feature_tile ? keys + tile : (keys > tile ? keys : tile);
    L.key_scalars = L.values + round16(32 * static_cast<size_t>(z.value_stride));
    L.value_scalars = L.key_scalars + 32 * sizeof(float) * z.key_scalars;
    L.weights = L.value_scalars + 32 * sizeof(float) * z.value_scalars;
    L.scores = L.weights + round16(weights_bytes());
    const size_t stage = round16(L.scores + (features ? scores_bytes() : 0));
    const size_t combine = round16(static_cast<size_t>(R) * (D + 2) * sizeof(float));
    L.area = stage > combine ? stage : combine;
    L.total = L.warps + warps * L.area;
    return L;
}

}  // namespace veloxquant::cuda::codec
