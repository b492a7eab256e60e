// How the split-K decode (turboquant_decode.cuh) divides each sequence's pages among its CTAs:
// head splits of equal page ranges, then at long contexts short tail splits, which the grid's
// split-major order launches last. Host code plans it (plan_decode_split, from the device's SMs
// and the kernel's residency); the kernel reads its range with split_range.
#pragma once

#include <cuda_runtime.h>

namespace veloxquant::cuda {

/// Split s < head_splits of a sequence takes pages [s b, s b + b) (b = pages_per_split); a later
/// one tail_pages from head_splits b on; `splits` in all. Ranges past the sequence's pages are
/// empty.
struct DecodeSplit {
    int pages_per_split = 1;
    int head_splits = 1;
    int tail_pages = 1;
    int splits = 1;
};

struct PageRange {
    int begin = 0, end = 0;
};

/// Pages [begin, end) of split `split` of a sequence of n_pages pages (end <= begin: none).
__host__ __device__ inline PageRange split_range(const DecodeSplit& s, int split, int n_pages) {
    const bool head = split < s.head_splits;
    const int begin =
        head ? split * s.pages_per_split
             : s.head_splits * s.pages_per_split + (split - s.head_splits) * s.tail_pages;
    const int end = begin + (head ? s.pages_per_split : s.tail_pages);
    return {begin, end < n_pages ? end : n_pages};
}

/// What the split plan depends on. Exactly one way to choose: `splits` > 0 forces that many even
/// splits (min(splits, pages)); `split_pages` > 0 forces floor(pages / split_pages) splits of
/// split_pages pages, then splits of tail_pages (split_pages where 0) for the rest; both 0: the
/// plan's choice for `sms` SMs that each hold `per_sm` of the kernel's CTAs.
struct DecodeSplitInputs {
    long long pages = 1;  ///< pages of the longest sequence
    long long units = 1;  ///< sequences x KV heads
    int sms = 1;
    int per_sm = 1;
    double tail_share = 0.1;  ///< share of a sequence's pages the plan leaves to tail splits
    /// Tail pieces scaled to the head splits (plan_decode_split), for a kernel whose loop is fast
    /// enough that a CTA's set-up is a large part of a short tail: the head-dim-64 1-bit / 2-bit
    /// one of groups of up to 4.
    bool scaled_tails = false;
    int splits = 0;
    int split_pages = 0;
    int tail_pages = 0;
};

/// The split for these inputs; false where they are invalid (negative or conflicting forced
/// values, no pages or units, or more CTAs than a grid holds).
bool plan_decode_split(const DecodeSplitInputs& in, DecodeSplit& out);

}  // namespace veloxquant::cuda
