// The generic attention's split plan (codec_split.h), on the host: against an exhaustive search
// over every chunk count a split could take, and at the H200's shapes that were measured
// (bench/cuda/decode_tuning.md, session s).
#include <gtest/gtest.h>

#include <random>

#include "cuda/codec_split.h"

using veloxquant::cuda::CodecSplit;
using veloxquant::cuda::plan_codec_split;

namespace {

// Every per in [1, chunks]: when the last wave ends, in chunks a slot runs, the earliest, and of
// those the fewest splits.
CodecSplit exhaustive(long long units, int chunks, long long wave) {
    CodecSplit best{chunks, 1};
    long long best_cost = -1;
    for (int per = 1; per <= chunks; ++per) {
        const int splits = (chunks + per - 1) / per;
        const long long waves = (units * splits + wave - 1) / wave;
        const long long cost = waves * (per + veloxquant::cuda::kSetupChunks);
        if (best_cost < 0 || cost < best_cost || (cost == best_cost && splits < best.splits))
            best = {per, splits}, best_cost = cost;
    }
    return best;
}

long long cost(const CodecSplit& s, long long units, long long wave) {
    return (units * s.splits + wave - 1) / wave *
           (s.chunks_per_split + veloxquant::cuda::kSetupChunks);
}

}  // namespace

TEST(CodecSplit, MatchesAnExhaustiveSearch) {
    std::mt19937 rng(7);
    for (int trial = 0; trial < 3000; ++trial) {
        const long long units = 1 + rng() % (trial % 3 == 0 ? 4096 : 96);
        const int chunks = 1 + static_cast<int>(rng() % (trial % 5 == 0 ? 2048 : 300));
        const long long wave = 1 + rng() % 1100;
        const CodecSplit got = plan_codec_split(units, chunks, wave);
        const CodecSplit want = exhaustive(units, chunks, wave);
        ASSERT_EQ(cost(got, units, wave), cost(want, units, wave))
            << units << " units, " << chunks << " chunks, wave " << wave;
        ASSERT_EQ(got.splits, want.splits)
            << units << " units, " << chunks << " chunks, wave " << wave;
        // The splits cover the chunks, none of them empty.
        ASSERT_GE(static_cast<long long>(got.splits) * got.chunks_per_split, chunks);
        ASSERT_LT(static_cast<long long>(got.splits - 1) * got.chunks_per_split, chunks);
    }
}

TEST(CodecSplit, TakesTheMeasuredShapesOnTheH200) {
    // 132 SMs x 4 CTAs (most decode kernels); one sequence of 32K tokens (8 KV heads, 256 chunks
    // of 128 tokens): 64 splits of 4 chunks, one wave, as before session s.
    CodecSplit s = plan_codec_split(8, 256, 528);
    EXPECT_EQ(s.splits, 64);
    EXPECT_EQ(s.chunks_per_split, 4);
    // 8 sequences: 8 splits of 32 chunks fill one wave (512 CTAs); 9 of 29 took 1.09 waves.
    s = plan_codec_split(64, 256, 528);
    EXPECT_EQ(s.splits, 8);
    EXPECT_EQ(s.chunks_per_split, 32);
    // 3 CTAs an SM (fp16's staged codes): 43 splits of 6 chunks, 344 CTAs.
    s = plan_codec_split(8, 256, 396);
    EXPECT_EQ(s.splits, 43);
    // A 512-query prefill chunk, 2048 (unit, row block) pairs: one split each (256 splits of
    // one chunk would end the last wave 3% sooner but for the CTAs' set-up).
    s = plan_codec_split(2048, 256, 528);
    EXPECT_EQ(s.splits, 1);
    EXPECT_EQ(s.chunks_per_split, 256);
}

TEST(CodecSplit, DegenerateInputsGiveOneWholeSplit) {
    const CodecSplit s = plan_codec_split(0, 0, 0);
    EXPECT_EQ(s.splits, 1);
    EXPECT_EQ(s.chunks_per_split, 1);
    EXPECT_EQ(plan_codec_split(5, 1, 528).splits, 1);
}
