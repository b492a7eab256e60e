#include "cuda/decode_split.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace veloxquant::cuda {

namespace {

// Pages per split of the even plan. What counts is the busiest SM's work. It runs
// k = ceil(CTAs / SMs) CTAs, per_sm at a time, each its pages plus kCtaPages of set-up (tables,
// query rotation, the first pages' latency: ~8.5 us by phase stamps, the time of ~20 pages: 18
// fits best); with one or two CTAs resident an SM reads pages at 70% and 93% of its rate with
// three (H200: forced splits at B = 1, 8, 32 and N = 8K-128K, bench/cuda/decode_tuning.md). The
// pages per CTA that minimize that cost: e.g. 33 splits (two CTAs per SM) rather than 49 (three)
// at B = 1, N = 128K, 4.7% faster; 16 (one) rather than 43 at N = 8K, 20%. For each k up to 8
// waves the most splits that keep k CTAs per SM are the candidate (fewer only add pages per CTA).
long long even_pages_per_split(long long pages, long long units, long long sms, long long per_sm) {
    constexpr double kCtaPages = 18;
    auto rate = [](long long resident_ctas) {
        return resident_ctas == 1 ? 0.70 : resident_ctas == 2 ? 0.93 : 1.0;
    };
    long long pps = pages;
    double best = -1;
    for (long long k_max = 1; k_max <= 8 * per_sm; ++k_max) {
        const long long splits = std::clamp<long long>(k_max * sms / units, 1, pages);
        const long long per_cta = (pages + splits - 1) / splits;
        const long long ctas = units * ((pages + per_cta - 1) / per_cta);
        const long long k = (ctas + sms - 1) / sms, full = k / per_sm, rest = k % per_sm;
        double cost = full * per_sm * (per_cta / rate(per_sm) + kCtaPages);
        if (rest > 0) cost += rest * (per_cta / rate(rest) + kCtaPages);
        if (best < 0 || cost < best) best = cost, pps = per_cta;
    }
    return pps;
}

}  // namespace

bool plan_decode_split(const DecodeSplitInputs& in, DecodeSplit& out) {
    if (in.pages < 1 || in.units < 1 || in.sms < 1 || in.per_sm < 1 || in.splits < 0 ||
        in.split_pages < 0 || in.tail_pages < 0 || (in.splits > 0 && in.split_pages > 0) ||
        (in.tail_pages > 0 && in.split_pages == 0) || !(in.tail_share >= 0 && in.tail_share < 1))
        return false;
    const long long pages = in.pages;
    long long pps, head, tail, tails = 0;
    if (in.split_pages > 0) {
        pps = std::min<long long>(in.split_pages, pages);
        head = pages / pps;
        const long long rest = pages - head * pps;  // < pps: a longer tail covers no more
        tail = std::min<long long>(in.tail_pages > 0 ? in.tail_pages : pps, std::max(rest, 1LL));
        tails = (rest + tail - 1) / tail;
    } else if (in.splits > 0) {  // n splits: pages % n of q + 1 pages, then q (q = pages / n)
        const long long n = std::min<long long>(in.splits, pages), q = pages / n, r = pages % n;
        pps = r > 0 ? q + 1 : q;
        head = r > 0 ? r : n;
        tail = q;
        tails = n - head;
    } else {
        pps = even_pages_per_split(pages, in.units, in.sms, in.per_sm);
        head = (pages + pps - 1) / pps;  // the last may be short
        tail = pps;
        // Tail splits. In a wave that fills the SMs the CTAs of equal page ranges end far apart
        // (96-157 us at B=8, N=128K: SMs with two CTAs, memory bandwidth shared unevenly), and
        // the decode waits for the last. So at long contexts the head splits give up a share of
        // each sequence's pages (DecodeKernel::tail_share) to tail splits of about kTailPiece
        // pages, which the grid's split-major order launches last, onto the SMs that finish
        // first. H200, N=128K, A/B against even splits: B=8 1-bit keys / 2-bit values 1.8% faster
        // (d=64 3.7%), 4-bit keys and values 1.7%, two 2-bit key stages 5.6%, B=32 2%. Shorter
        // splits, or a wave with free slots, only add set-up (B=8, N=32K and B=1, N=128K: 5-13%
        // slower); bench/cuda/decode_tuning.md.
        constexpr long long kTailPiece = 56, kTailMinSplit = 4 * kTailPiece;
        if (pps >= kTailMinSplit &&
            in.units * head > static_cast<long long>(in.per_sm - 1) * in.sms) {
            long long share = std::llround(static_cast<double>(pages) * in.tail_share),
                      piece = kTailPiece;
            // Scaled tails, where the even splits fill one wave and take 448-1023 pages: pieces
            // of a sixteenth of them, and at most three pieces' worth of pages. H200, d=64 1-bit
            // keys / 2-bit values, N=128K: B=8 takes 4 x 488 + 3 x 32 pages, 0.8% faster than
            // the 4 x 480 + 2 x 64 of a 1/16 share (forced shapes of 484-492 head pages and
            // three tails of 28-48 lay within 0.6% of each other; its faster loop leaves a
            // CTA's set-up a larger part of a short tail); B=32 keeps 1920 + 2 x 64, as 1960 +
            // 30, 30, 28 was 1.1% slower (cuda_h200_20261204zl_splits.txt).
            if (in.scaled_tails && pps >= 448 && pps < 1024 &&
                in.units * head <= static_cast<long long>(in.per_sm) * in.sms) {
                piece = pps / 16;
                share = std::min(share, 3 * piece);
            }
            pps = (pages - share + head - 1) / head;
            const long long rest = pages - head * pps;
            if (rest > 0) {
                tails = std::max<long long>(1, std::llround(static_cast<double>(rest) / piece));
                tail = (rest + tails - 1) / tails;
                tails = (rest + tail - 1) / tail;
            }
        }
    }
    if ((head + tails) * in.units > std::numeric_limits<int>::max()) return false;
    out.pages_per_split = static_cast<int>(pps);
    out.head_splits = static_cast<int>(head);
    out.tail_pages = static_cast<int>(tail);
    out.splits = static_cast<int>(head + tails);
    return true;
}

}  // namespace veloxquant::cuda
