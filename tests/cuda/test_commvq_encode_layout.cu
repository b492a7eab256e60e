// commvq's tensor-search key encoder (src/cuda/commvq_encode.cuh): the shared-memory layout of its
// CTAs (cvq_tensor_layout), checked on the host for the stages, codebook sizes, head dims, CTA
// sizes and budgets it meets: regions 16-byte aligned and apart, a group's slices staged once
// exactly where they fit, and the kernel's own reading of the layout from the bytes it is given
// (the launch's) the same as the host's. Runs without a device (host code only).
#include <gtest/gtest.h>

#include <string>

#include "cuda/commvq_encode.cuh"

namespace veloxquant::cuda::codec {
namespace {

int log2_of(int c) {
    int b = 0;
    while ((1 << b) < c) ++b;
    return b;
}

TEST(CommvqEncodeLayout, RegionsApartAndTheKernelReadsTheSameLayout) {
    // Budgets: four CTAs of an H100/H200 SM, half of a 100 KB SM, the lane scans' former pool.
    for (const int budget : {kCvqTensorSmemBytes, 100 * 1024 / 2 - 1024, 28160})
        for (int stages = 1; stages <= 4; ++stages)
            for (const int codewords : {8, 16, 64, 256})
                for (const int d : {64, 128, 256})
                    for (const int nt : {32, 64, 128, kCvqTensorTokens}) {
                        const int groups = d / kCvqTensorDim;
                        const int code_bytes = (stages * groups * log2_of(codewords) + 7) / 8;
                        const std::string at = "budget " + std::to_string(budget) + " S " +
                                               std::to_string(stages) + " C " +
                                               std::to_string(codewords) + " d " +
                                               std::to_string(d) + " nt " + std::to_string(nt);
                        const CvqTensorLayout L =
                            cvq_tensor_layout(stages, codewords, code_bytes, nt, budget);
                        // Stage indices (a byte a token and stage), warp rows, codes, slices.
                        ASSERT_GE(L.rows, stages * nt) << at;
                        ASSERT_EQ(L.codes, L.rows + nt / 32 * static_cast<int>(sizeof(CvqWarpRows)))
                            << at;
                        ASSERT_GE(L.code_stride, code_bytes) << at;
                        ASSERT_EQ(L.code_stride % 4, 0) << at;
                        ASSERT_GE(L.slices, L.codes + L.code_stride * nt) << at;
                        for (const int offset : {L.rows, L.codes, L.slices, L.slice_bytes})
                            ASSERT_EQ(offset % 16, 0) << at;
                        // A slice: bounds (1 + 8 floats), fragments, words, norms2.
                        ASSERT_GE(cvq_tensor_bound_bytes(), 4 * (1 + kCvqTensorDim)) << at;
                        ASSERT_EQ(L.slice_bytes, cvq_tensor_bound_bytes() +
                                                     cvq_fragment_bytes(codewords) +
                                                     4 * codewords * kCvqTensorDim +
                                                     (4 * codewords + 15) / 16 * 16)
                            << at;
                        // A group's slices stay staged exactly where all of them fit.
                        const bool all = L.slices + stages * L.slice_bytes <= budget;
                        ASSERT_EQ(L.buffers, all ? stages : 1) << at;
                        ASSERT_EQ(L.bytes, L.slices + L.buffers * L.slice_bytes) << at;
                        if (L.bytes > budget) continue;  // the launcher's fit test refuses it
                        // The kernel, given L.bytes, lays out the same.
                        const CvqTensorLayout K =
                            cvq_tensor_layout(stages, codewords, code_bytes, nt, L.bytes);
                        ASSERT_EQ(K.buffers, L.buffers) << at;
                        ASSERT_EQ(K.bytes, L.bytes) << at;
                        ASSERT_EQ(K.slices, L.slices) << at;
                    }
}

TEST(CommvqEncodeLayout, CalibrationsDefaultKeepsAGroupStaged) {
    // 2 bits at d = 128: 2 stages of 256 codewords, 16 groups, 32-byte codes.
    const CvqTensorLayout two =
        cvq_tensor_layout(2, 256, 32, kCvqTensorTokens, kCvqTensorSmemBytes);
    EXPECT_EQ(two.buffers, 2);
    EXPECT_LE(two.bytes, kCvqTensorSmemBytes);
    // Four CTAs and their 1 KB reserves in an H200 SM's 228 KB.
    EXPECT_LE(4 * (kCvqTensorSmemBytes + 1024), 228 * 1024);
    // 3 bits: three slices do not fit, one is staged a step.
    const CvqTensorLayout three =
        cvq_tensor_layout(3, 256, 48, kCvqTensorTokens, kCvqTensorSmemBytes);
    EXPECT_EQ(three.buffers, 1);
    EXPECT_LE(three.bytes, kCvqTensorSmemBytes);
}

}  // namespace
}  // namespace veloxquant::cuda::codec
