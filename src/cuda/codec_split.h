// How the generic attention (codec_backend.cu) divides each (unit, row block)'s chunks of
// tokens among its CTAs. Every split takes the same whole number of chunks. The plan minimizes
// when the last wave ends, waves x (chunks a split + kSetupChunks), the second term a CTA's
// set-up, which keeps a prefill from splitting into hundreds of short CTAs to trim its last
// wave; of equal times it takes the fewest splits (fewer partial states to merge). Filling one
// wave but for a few CTAs is what it avoids: 8 sequences of 32K tokens, 64 units on 528 CTA
// slots, ran 9 splits of 29 chunks in 1.09 waves where 8 of 32 fit in one.
#pragma once

#include <algorithm>

namespace veloxquant::cuda {

/// A CTA's fixed cost, in chunks of its loop: staging its tables and query states, writing and
/// merging its partial state.
constexpr int kSetupChunks = 1;

struct CodecSplit {
    int chunks_per_split = 1;
    int splits = 1;
};

/// The plan for `units` independent (unit, row block) pairs of `chunks` chunks each (>= 1), on
/// `wave` CTA slots (SMs x the kernel's resident CTAs an SM, >= 1).
inline CodecSplit plan_codec_split(long long units, int chunks, long long wave) {
    units = std::max(1LL, units);
    chunks = std::max(1, chunks);
    wave = std::max(1LL, wave);
    CodecSplit best{chunks, 1};
    long long best_cost = -1;
    for (int s = 1; s <= chunks; ++s) {
        const int per = (chunks + s - 1) / s;
        if ((chunks + per - 1) / per != s) continue;  // s splits of per: one would be empty
        const long long waves = (units * s + wave - 1) / wave;
        if (best_cost >= 0 && waves * (1 + kSetupChunks) > best_cost) break;  // only dearer on
        const long long cost = waves * (per + kSetupChunks);
        if (best_cost < 0 || cost < best_cost) best = {per, s}, best_cost = cost;
    }
    return best;
}

}  // namespace veloxquant::cuda
