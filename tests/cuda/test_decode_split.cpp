// The decode's split plan (decode_split.h), on the host: every plan covers each sequence's pages
// once, in order; forced plans take the shapes they name; and at the H200's shapes the plan is
// the one measured best (bench/cuda/decode_tuning.md).
#include <gtest/gtest.h>

#include <limits>
#include <random>
#include <string>

#include "cuda/decode_split.h"

using veloxquant::cuda::DecodeSplit;
using veloxquant::cuda::DecodeSplitInputs;
using veloxquant::cuda::PageRange;
using veloxquant::cuda::plan_decode_split;
using veloxquant::cuda::split_range;

namespace {

DecodeSplitInputs inputs(long long pages, long long units, int sms, int per_sm, double share) {
    DecodeSplitInputs in;
    in.pages = pages, in.units = units, in.sms = sms, in.per_sm = per_sm, in.tail_share = share;
    return in;
}

// The splits' ranges tile [0, n_pages) in order, each split non-empty at the planned length and
// none past it; a shorter sequence's ranges end at its own length.
void expect_tiles(const DecodeSplit& s, long long pages) {
    ASSERT_GE(s.splits, 1);
    ASSERT_GE(s.head_splits, 1);
    ASSERT_LE(s.head_splits, s.splits);
    int next = 0;
    for (int k = 0; k < s.splits; ++k) {
        const PageRange r = split_range(s, k, static_cast<int>(pages));
        EXPECT_EQ(r.begin, next) << "split " << k;
        EXPECT_GT(r.end, r.begin) << "split " << k << " is empty";
        next = r.end;
    }
    EXPECT_EQ(next, pages);
    const int shorter = static_cast<int>(pages / 3);
    int covered = 0;
    for (int k = 0; k < s.splits; ++k) {
        const PageRange r = split_range(s, k, shorter);
        if (r.end > r.begin) covered += r.end - r.begin;
    }
    EXPECT_EQ(covered, shorter);
}

DecodeSplit plan(const DecodeSplitInputs& in) {
    DecodeSplit s;
    EXPECT_TRUE(plan_decode_split(in, s));
    return s;
}

}  // namespace

TEST(DecodeSplit, EveryPlanTilesThePages) {
    std::mt19937 rng(11);
    for (int trial = 0; trial < 3000; ++trial) {
        DecodeSplitInputs in =
            inputs(1 + rng() % 5000, 1 + rng() % 512, trial % 3 == 0 ? 132 : 1 + rng() % 160,
                   1 + rng() % 4, trial % 2 ? 0.1 : 1.0 / 16);
        in.scaled_tails = trial % 4 == 3;
        if (trial % 5 == 1) in.splits = 1 + rng() % 400;
        if (trial % 5 == 2) in.split_pages = 1 + rng() % 600, in.tail_pages = rng() % 80;
        SCOPED_TRACE("pages " + std::to_string(in.pages) + " units " + std::to_string(in.units) +
                     " sms " + std::to_string(in.sms) + " per_sm " + std::to_string(in.per_sm) +
                     " splits " + std::to_string(in.splits) + " split_pages " +
                     std::to_string(in.split_pages) + " tail_pages " +
                     std::to_string(in.tail_pages));
        const DecodeSplit s = plan(in);
        expect_tiles(s, in.pages);
        if (in.splits > 0) EXPECT_EQ(s.splits, std::min<long long>(in.splits, in.pages));
        if (::testing::Test::HasFailure()) return;
    }
}

TEST(DecodeSplit, ForcedShapes) {
    DecodeSplitInputs in = inputs(32, 4, 132, 3, 0.1);
    in.splits = 5;  // 7, 7, 6, 6, 6
    DecodeSplit s = plan(in);
    EXPECT_EQ(s.splits, 5);
    EXPECT_EQ(s.pages_per_split, 7);
    EXPECT_EQ(s.head_splits, 2);
    EXPECT_EQ(split_range(s, 4, 32).end - split_range(s, 4, 32).begin, 6);
    in.splits = 320;  // more than the pages: one page each
    s = plan(in);
    EXPECT_EQ(s.splits, 32);
    EXPECT_EQ(s.pages_per_split, 1);
    in.splits = 0, in.split_pages = 7, in.tail_pages = 2;  // 4 x 7, then 2 x 2
    s = plan(in);
    EXPECT_EQ(s.head_splits, 4);
    EXPECT_EQ(s.splits, 6);
    EXPECT_EQ(split_range(s, 4, 32).begin, 28);
    EXPECT_EQ(split_range(s, 5, 32).end, 32);
    // A tail longer than the rest is clipped to it: no page index past the int range.
    in.split_pages = 10, in.tail_pages = std::numeric_limits<int>::max();
    s = plan(in);
    EXPECT_EQ(s.splits, 4);
    EXPECT_EQ(s.tail_pages, 2);
    expect_tiles(s, 32);
    in.split_pages = 40, in.tail_pages = 0;  // more than the pages: one split
    EXPECT_EQ(plan(in).splits, 1);
    in.split_pages = 5;  // 6 x 5, then the 2 left in one split
    s = plan(in);
    EXPECT_EQ(s.head_splits, 6);
    EXPECT_EQ(s.splits, 7);
}

TEST(DecodeSplit, RejectsInvalidInputs) {
    DecodeSplit s;
    DecodeSplitInputs in = inputs(32, 4, 132, 3, 0.1);
    in.splits = 4, in.split_pages = 8;  // two ways at once
    EXPECT_FALSE(plan_decode_split(in, s));
    in = inputs(32, 4, 132, 3, 0.1);
    in.tail_pages = 4;  // a tail without head splits
    EXPECT_FALSE(plan_decode_split(in, s));
    in = inputs(32, 4, 132, 3, 0.1);
    in.splits = -1;
    EXPECT_FALSE(plan_decode_split(in, s));
    EXPECT_FALSE(plan_decode_split(inputs(0, 4, 132, 3, 0.1), s));
    EXPECT_FALSE(plan_decode_split(inputs(32, 0, 132, 3, 0.1), s));
    EXPECT_FALSE(plan_decode_split(inputs(32, 4, 132, 3, 1.0), s));
    in = inputs(1 << 25, 1 << 20, 132, 3, 0.1);  // more CTAs than a grid holds
    in.splits = 1 << 12;
    EXPECT_FALSE(plan_decode_split(in, s));
}

// The H200's shapes (132 SMs, three CTAs of the mixed-row kernels each), 8 KV heads, N = 128K
// (2048 pages): the measured best of bench/cuda/decode_tuning.md's sweep.
TEST(DecodeSplit, H200Plans) {
    // B = 8, 1-bit keys / 2-bit values (1/16 to the tail): 6 x 320 pages, then 2 x 64
    DecodeSplit s = plan(inputs(2048, 64, 132, 3, 1.0 / 16));
    EXPECT_EQ(s.pages_per_split, 320);
    EXPECT_EQ(s.head_splits, 6);
    EXPECT_EQ(s.tail_pages, 64);
    EXPECT_EQ(s.splits, 8);
    // B = 8, 4-bit values (1/10): 6 x 308, then 4 x 50
    s = plan(inputs(2048, 64, 132, 3, 0.1));
    EXPECT_EQ(s.pages_per_split, 308);
    EXPECT_EQ(s.head_splits, 6);
    EXPECT_EQ(s.tail_pages, 50);
    EXPECT_EQ(s.splits, 10);
    // B = 32: 3 x 640, then 2 x 64
    s = plan(inputs(2048, 256, 132, 3, 1.0 / 16));
    EXPECT_EQ(s.pages_per_split, 640);
    EXPECT_EQ(s.splits, 5);
    // No tail where the wave leaves SMs free or the splits are short: B = 1 (33 splits, two CTAs
    // an SM), B = 8 at N = 32K (4 splits).
    s = plan(inputs(2048, 8, 132, 3, 1.0 / 16));
    EXPECT_EQ(s.splits, 33);
    EXPECT_EQ(s.head_splits, 33);
    s = plan(inputs(512, 64, 132, 3, 1.0 / 16));
    EXPECT_EQ(s.splits, 4);
    EXPECT_EQ(s.head_splits, 4);
}

// The head_dim 64 1-bit / 2-bit kernel: two CTAs an SM, tail pieces scaled to the head splits.
TEST(DecodeSplit, H200PlansOfScaledTails) {
    // B = 8: 4 x 488 pages, then 3 x 32 (a 1/16 share would give 4 x 480 + 2 x 64)
    DecodeSplitInputs in = inputs(2048, 64, 132, 2, 1.0 / 16);
    DecodeSplit s = plan(in);
    EXPECT_EQ(s.pages_per_split, 480);
    in.scaled_tails = true;
    s = plan(in);
    EXPECT_EQ(s.pages_per_split, 488);
    EXPECT_EQ(s.head_splits, 4);
    EXPECT_EQ(s.tail_pages, 32);
    EXPECT_EQ(s.splits, 7);
    expect_tiles(s, 2048);
    // B = 32: even splits of 2048 pages are past the scaled range: 1920, then 2 x 64
    in.units = 256;
    s = plan(in);
    EXPECT_EQ(s.pages_per_split, 1920);
    EXPECT_EQ(s.tail_pages, 64);
    EXPECT_EQ(s.splits, 3);
    // Heads that take more than one wave (B = 24) keep the unscaled tails: 4 x 480 + 2 x 64
    in.units = 192;
    s = plan(in);
    EXPECT_EQ(s.pages_per_split, 480);
    EXPECT_EQ(s.tail_pages, 64);
}
