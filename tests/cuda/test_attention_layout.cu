// The generic attention's shared-memory layout (src/cuda/codec_attention_layout.cuh), checked on
// the host over a sweep of launch shapes against what the kernel (codec_attention.cuh) reads and
// writes in each region: no two regions that are live at once overlap, every region the copies,
// ldmatrix or float4 reads touch starts on 16 bytes, and the combine's (m, l, o[D]) per row fits
// a warp's area. Runs without a device (host code only).
#include <gtest/gtest.h>

#include <cstddef>
#include <string>
#include <vector>

#include "cuda/codec_attention_layout.cuh"
#include "device_codecs/fp16_device.h"
#include "device_codecs/qjl_device.h"
#include "device_codecs/tq_device.h"

namespace veloxquant::cuda::codec {
namespace {

struct Span {
    size_t begin, bytes;
    const char* name;
    size_t end() const { return begin + bytes; }
};

/// Every pair of spans disjoint (empty spans overlap nothing).
std::string overlaps(const std::vector<Span>& spans) {
    for (size_t i = 0; i < spans.size(); ++i)
        for (size_t j = i + 1; j < spans.size(); ++j) {
            const Span &a = spans[i], &b = spans[j];
            if (a.bytes && b.bytes && a.begin < b.end() && b.begin < a.end())
                return std::string(a.name) + " overlaps " + b.name;
        }
    return "";
}

constexpr int kWarpCount = 4;  // the kernel's kWarps

template <class Codec>
void check(int R, int D, const StageSizes& z, bool features, bool feature_tile) {
    const AttentionLayout L = attention_layout<Codec>(R, D, z, kWarpCount);
    const std::string at = "R " + std::to_string(R) + " D " + std::to_string(D) + " S " +
                           std::to_string(z.state_stride) + " span " +
                           std::to_string(z.feature_span) + " mode " + std::to_string(z.features) +
                           " keys " + std::to_string(z.key_stride) + " values " +
                           std::to_string(z.value_stride);
    // The CTA's regions: the rows' float states, the tables, the fp16 states, the warps' areas.
    const std::vector<Span> cta = {
        {0, static_cast<size_t>(R) * z.state_stride * sizeof(float), "states"},
        {L.tables, z.table_floats * sizeof(float), "tables"},
        {L.feature_states, features ? feature_states_bytes(z.feature_span) : 0, "fp16 states"},
        {L.warps, kWarpCount * L.area, "areas"}};
    ASSERT_EQ(overlaps(cta), "") << at;
    EXPECT_EQ(L.total, L.warps + kWarpCount * L.area) << at;
    // A warp's area while the chunk is staged and scored: keys, the feature tile, values, both
    // scalars, the weights and the scores. The value tile is written once the keys are scored:
    // it may lie over them, never over the staged values, scalars or weights.
    const size_t tile = feature_tile ? feature_tile_bytes(z.feature_span) : 0;
    const std::vector<Span> staged = {
        {0, 32 * static_cast<size_t>(z.key_stride), "staged keys"},
        {L.tile, tile, "feature tile"},
        {L.values, 32 * static_cast<size_t>(z.value_stride), "staged values"},
        {L.key_scalars, 32 * sizeof(float) * z.key_scalars, "key scalars"},
        {L.value_scalars, 32 * sizeof(float) * z.value_scalars, "value scalars"},
        {L.weights, weights_bytes(), "weights"},
        {L.scores, features ? scores_bytes() : 0, "scores"}};
    ASSERT_EQ(overlaps(staged), "") << at;
    std::vector<Span> summing(staged.begin() + 2, staged.end());
    summing.push_back({L.tile, tile_bytes(D), "value tile"});
    ASSERT_EQ(overlaps(summing), "") << at;
    for (const Span& s : staged) EXPECT_LE(s.end(), L.area) << s.name << ", " << at;
    EXPECT_LE(L.tile + tile_bytes(D), L.area) << at;
    // The combine: each warp's (m, l, o[D]) per row, D + 2 floats a row.
    EXPECT_LE(static_cast<size_t>(R) * (D + 2) * sizeof(float), L.area) << at;
    // 16-byte starts: cp.async of 16 bytes (keys, values), ldmatrix rows (tiles, fp16 states),
    // float4 reads of states and tables, uint4 zeroing of the area.
    for (size_t offset :
         {L.tables, L.feature_states, L.warps, L.area, L.tile, L.values, L.weights, L.scores})
        EXPECT_EQ(offset % 16, 0u) << at;
}

TEST(AttentionLayout, RegionsAreDisjointAlignedAndFit) {
    for (int R : {1, 4, 8})
        for (int D : {64, 128, 256})
            for (int S : {4, 64, 136, 512, 4352})
                // The codec's own state (feature_span) is all of S, or S less a centred launch's
                // W (CenterParams::floats(64) = 132 floats after it).
                for (int span : {S, S > 132 ? S - 132 : S})
                    for (int key_stride : {4, 20, 48, 272, 544})
                        for (int value_stride : {16, 48, 144, 528})
                            for (int scalars : {0, 1, 3})
                                for (int tables : {0, 20, 4100}) {
                                    StageSizes z;
                                    z.state_stride = S;
                                    z.feature_span = span;
                                    z.table_floats = tables;
                                    z.key_stride = key_stride;
                                    z.value_stride = value_stride;
                                    z.key_scalars = scalars;
                                    z.value_scalars = scalars == 3 ? 2 : scalars;
                                    z.features = kLaneScores;
                                    check<dev::TqDevice>(R, D, z, false, false);
                                    z.features = kFeatureTile;  // a codec without the form: lanes
                                    check<dev::TqDevice>(R, D, z, false, false);
                                    check<dev::QjlDevice>(R, D, z, true, true);
                                    z.features = kFeaturesInPlace;
                                    check<dev::Fp16Device>(R, D, z, true, false);
                                    if (testing::Test::HasFatalFailure()) return;
                                }
}

}  // namespace
}  // namespace veloxquant::cuda::codec
