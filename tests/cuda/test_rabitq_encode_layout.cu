// rabitq's warp encoder (src/cuda/rabitq_encode.cuh): each warp's shared-memory regions, checked
// on the host for every head dim and bit width the encoder takes, against what the kernel keeps
// in each (their sizes and alignments, none overlapping), and which parameters it refuses. Runs
// without a device (host code only).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <string>

#include "cuda/rabitq_encode.cuh"

namespace veloxquant::cuda::codec {
namespace {

dev::RaBitQDevice::Params params(int d, int bits, int clusters, bool hadamard = true) {
    dev::RaBitQDevice::Params p;
    p.d = d;
    p.bits = bits;
    p.clusters = clusters;
    p.id_bytes = clusters <= 256 ? 1 : 2;
    p.rotation.d = d;
    p.rotation.hadamard = hadamard ? 1 : 0;
    return p;
}

constexpr size_t kSmemOptin = 227 * 1024;  // the H200's opt-in shared memory a CTA

TEST(RabitqEncodeLayout, RegionsHoldWhatTheKernelKeepsThere) {
    for (const int d : {32, 64, 128, 256})
        for (int bits = 1; bits <= 8; ++bits)
            for (const int clusters : {1, 64, 300}) {
                const auto p = params(d, bits, clusters);
                const std::string at = "d " + std::to_string(d) + " bits " + std::to_string(bits) +
                                       " clusters " + std::to_string(clusters);
                const RbWarpLayout L = RbWarpLayout::of(p);
                const int events = d * ((1 << (bits - 1)) - 1);  // every (j, s) with s < M
                ASSERT_EQ(L.events, events) << at;
                // The doubles at 0: x (d floats), the terms of ||e||^2 and of <x_bar, e> (d
                // each), the events' t, then the scan's Q (one each); then |e| (d), the cursors
                // (one per bucket and one more) and steps (d ints), the code, the events' tags.
                EXPECT_GE(L.abs_e, 8 * std::max(d, events)) << at;
                EXPECT_GE(L.cursor - L.abs_e, 8 * d) << at;
                EXPECT_GE(L.words - L.cursor, 4 * std::max(events + 1, d)) << at;
                EXPECT_GE(L.tags - L.words, dev::RaBitQDevice::code_bytes(p)) << at;
                EXPECT_GE(L.bytes - L.tags, 2 * events) << at;
                EXPECT_EQ(L.abs_e % 8, 0) << at;
                EXPECT_EQ(L.cursor % 4, 0) << at;
                EXPECT_EQ(L.words % 4, 0) << at;
                EXPECT_EQ(L.tags % 2, 0) << at;
                // Each warp's region and the staged centroids after them start on 16 bytes.
                EXPECT_EQ(L.bytes % 16, 0) << at;
                EXPECT_EQ(rabitq_warps_smem_bytes(p), static_cast<size_t>(kRbWarps) * L.bytes);
                // Staged centroid rows: 16-byte aligned, 4 banks (mod 32) apart, so eight lanes'
                // 16-byte loads of eight rows touch distinct banks.
                EXPECT_EQ((d + kRbRowPad) % 4, 0) << at;
                EXPECT_EQ((d + kRbRowPad) % 32, 4) << at;
                EXPECT_EQ(rabitq_centroid_smem_bytes(clusters, d),
                          sizeof(float) * clusters * (d + kRbRowPad))
                    << at;
                // The encoder takes every width up to kRbMaxEvents events a token.
                EXPECT_EQ(BulkKeyEncoder<dev::RaBitQDevice>::usable(p, kSmemOptin),
                          events <= kRbMaxEvents)
                    << at;
            }
}

TEST(RabitqEncodeLayout, RefusesWhatItCannotEncode) {
    using Bulk = BulkKeyEncoder<dev::RaBitQDevice>;
    EXPECT_TRUE(Bulk::usable(params(128, 3, 64), kSmemOptin));
    EXPECT_FALSE(Bulk::usable(params(128, 3, 64, false), kSmemOptin));  // a dense rotation
    EXPECT_FALSE(Bulk::usable(params(16, 3, 64), kSmemOptin));          // under a warp
    EXPECT_FALSE(Bulk::usable(params(96, 3, 64), kSmemOptin));          // not a power of two
    EXPECT_FALSE(Bulk::usable(params(512, 2, 64), kSmemOptin));         // past kMaxDim
    EXPECT_FALSE(Bulk::usable(params(128, 5, 64), kSmemOptin));         // 1920 events
    EXPECT_FALSE(Bulk::usable(params(128, 3, 64), 32 * 1024));          // a smaller device
}

}  // namespace
}  // namespace veloxquant::cuda::codec
