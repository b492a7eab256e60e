// KeyNormObserver against an independent reference: after chunks of many sizes its statistics
// are those of every norm seen (a two-pass mean and sum of squared deviations in long double over
// all of them), each chunk's flags are the tail test under those statistics, and flagging every
// head at once (a thread a head) or from threads of one's own leaves the same flags and the
// same statistics, bit for bit, as one head after another.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <thread>
#include <vector>

#include "veloxquant/observer.h"

namespace veloxquant {
namespace {

std::vector<float> lognormal_norms(int n, uint32_t seed) {
    std::mt19937 gen(seed);
    std::lognormal_distribution<float> lognormal(0.0f, 0.5f);
    std::vector<float> v(n);
    for (float& x : v) x = lognormal(gen);
    return v;
}

// log of a norm as the observer takes it: a zero norm clamped to 1e-30.
long double log_of(float x) {
    return std::log(std::max(static_cast<long double>(x), static_cast<long double>(1e-30)));
}

struct Reference {
    long double mean = 0.0L, m2 = 0.0L;
};

Reference reference_of(const std::vector<float>& seen) {
    Reference r;
    for (const float x : seen) r.mean += log_of(x);
    r.mean /= seen.size();
    for (const float x : seen) r.m2 += (log_of(x) - r.mean) * (log_of(x) - r.mean);
    return r;
}

TEST(KeyNormObserver, StatisticsAndFlagsFollowEveryNormSeen) {
    const double z = 2.0;
    const int min_count = 32;
    KeyNormObserver observer(z, min_count);
    std::vector<float> norms = lognormal_norms(6000, 7);
    norms[2000] = 500.0f;  // far out in the upper tail
    norms[5990] = 0.0f;    // a zero norm: the lowest log (in the last chunk: it widens the spread)
    std::vector<float> seen;
    int at = 0, flagged = 0;
    for (const int n : {1, 7, 24, 300, 4096, 5, 1567}) {
        const std::vector<float> chunk(norms.begin() + at, norms.begin() + at + n);
        at += n;
        std::vector<uint8_t> flags(n);
        observer.observe_and_flag(3, 1, chunk.data(), n, flags.data());
        seen.insert(seen.end(), chunk.begin(), chunk.end());
        const Reference r = reference_of(seen);
        const KeyNormObserver::Stats s = observer.stats(3, 1);
        ASSERT_EQ(s.count, static_cast<int64_t>(seen.size()));
        EXPECT_NEAR(s.mean_log, static_cast<double>(r.mean), 1e-12 * (1.0 + std::fabs(s.mean_log)));
        EXPECT_NEAR(s.m2_log, static_cast<double>(r.m2), 1e-10 * static_cast<double>(r.m2));
        EXPECT_EQ(s.min_norm, *std::min_element(seen.begin(), seen.end()));
        EXPECT_EQ(s.max_norm, *std::max_element(seen.begin(), seen.end()));
        const long double spread = seen.size() > 1 ? z * std::sqrt(r.m2 / (seen.size() - 1)) : 0.0L;
        for (int t = 0; t < n; ++t) {
            const long double off = std::fabs(log_of(chunk[t]) - r.mean);
            if (std::fabs(off - spread) < 1e-9L) continue;  // at the threshold: either way
            const bool want = static_cast<int>(seen.size()) >= min_count && off > spread;
            EXPECT_EQ(flags[t] != 0, want) << "chunk of " << n << ", token " << t;
            flagged += flags[t];
        }
    }
    EXPECT_GT(flagged, 10);
    EXPECT_EQ(observer.stats(3, 0).count, 0);  // other heads untouched
}

void expect_same_stats(const KeyNormObserver::Stats& a, const KeyNormObserver::Stats& b, int h) {
    EXPECT_EQ(a.count, b.count) << "head " << h;
    EXPECT_EQ(a.mean_log, b.mean_log) << "head " << h;
    EXPECT_EQ(a.m2_log, b.m2_log) << "head " << h;
    EXPECT_EQ(a.min_norm, b.min_norm) << "head " << h;
    EXPECT_EQ(a.max_norm, b.max_norm) << "head " << h;
}

TEST(KeyNormObserver, HeadsInParallelFlagAsOneByOne) {
    const int heads = 8, layer = 2;
    KeyNormObserver serial(3.0, 32), together(3.0, 32), threaded(3.0, 32);
    for (const int n : {40, KeyNormObserver::kParallelTokens, 3000}) {  // below and past it
        const std::vector<float> norms = lognormal_norms(heads * n, 11 + n);
        std::vector<uint8_t> one(heads * n), all(heads * n), own(heads * n);
        for (int h = 0; h < heads; ++h)
            serial.observe_and_flag(layer, h, norms.data() + h * n, n, one.data() + h * n);
        together.observe_and_flag_heads(layer, heads, norms.data(), n, all.data());
        std::vector<std::thread> threads;
        for (int h = 0; h < heads; ++h)
            threads.emplace_back([&, h] {
                threaded.observe_and_flag(layer, h, norms.data() + h * n, n, own.data() + h * n);
            });
        for (std::thread& t : threads) t.join();
        EXPECT_EQ(all, one) << n << " tokens";
        EXPECT_EQ(own, one) << n << " tokens";
        for (int h = 0; h < heads; ++h) {
            expect_same_stats(together.stats(layer, h), serial.stats(layer, h), h);
            expect_same_stats(threaded.stats(layer, h), serial.stats(layer, h), h);
        }
    }
}

}  // namespace
}  // namespace veloxquant
