// rabitq's warp encoder (rabitq_encode.cuh) finds the best prefix of the sorted critical values
// with the whole warp (rb_best_prefix_warp), falling back to one lane's sequential scan
// (rb_best_prefix) where it cannot prove the two equal, and adds ||e||_1 as a warp tree where the
// sum is provably exact (rb_term_sum). On a GPU, on residuals of several kinds: the sequential
// scan and the sum must equal this file's host reference (rabitq.cpp's loop, in double), and the
// warp scan must equal it or decline (-1). Residuals spread over 2^60 must make it decline;
// rabitq-like residuals must mostly take the warp path. The events' sort before it
// (rb_sorted_events: buckets of an estimate of t, a check, lane 0's fallback sort) must give the
// host's (t, j) order, also where the estimate puts two events in the wrong buckets, where two
// events' sort keys tie against their t's order and where |e| lies below float's normal range
// (t itself the keys). rb_scale's f (from a tree of ||e||^2's terms, else their ordered sum) must
// be the host's, also on a float's rounding edge. Skips without a device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

#include "cuda/rabitq_encode.cuh"
#include "cuda_test_helpers.h"

namespace veloxquant::cuda {
namespace {

using vqtest::DeviceBuffer;

constexpr int kD = 128, kC = kD / 32;

struct ScanCase {
    std::vector<double> abs_e;   // kD
    std::vector<uint16_t> tags;  // j << 8 | s, in (s / |e_j|, j) order
};

// One warp per case.
__global__ void scan_kernel(const double* abs_e, const uint16_t* tags, const int* counts, int m,
                            int max_events, double* q, int* warp_len, int* lane_len, double* sums) {
    const int k = static_cast<int>(blockIdx.x), lane = static_cast<int>(threadIdx.x);
    const double* a = abs_e + static_cast<size_t>(k) * kD;
    const uint16_t* t = tags + static_cast<size_t>(k) * max_events;
    double v[kC];
    int low = INT_MAX;
    for (int c = 0; c < kC; ++c) {
        v[c] = a[32 * c + lane];
        low = min(low, codec::rb_lowest_bit(v[c]));
    }
    low = codec::rb_warp_min(low);
    const double abs_sum = codec::rb_term_sum<kC>(v, a, kD, lane);
    const int n = counts[k];
    const int len = codec::rb_best_prefix_warp(a, t, q + static_cast<size_t>(k) * max_events, n, kD,
                                               m, abs_sum, low, lane);
    if (lane == 0) {
        warp_len[k] = len;
        lane_len[k] = codec::rb_best_prefix(a, t, n, kD, abs_sum);
        sums[k] = abs_sum;
    }
}

// The events of every coordinate with |e_j| > 0 (s = 1 .. m - 1), sorted by (t, j).
std::vector<uint16_t> sorted_events(const std::vector<double>& abs_e, int m) {
    std::vector<std::tuple<double, int, int>> ev;
    for (int j = 0; j < kD; ++j)
        if (abs_e[j] > 0.0)
            for (int s = 1; s < m; ++s) ev.emplace_back(s / abs_e[j], j, s);
    std::sort(ev.begin(), ev.end());
    std::vector<uint16_t> tags;
    for (const auto& [t, j, s] : ev) tags.push_back(static_cast<uint16_t>(j << 8 | s));
    return tags;
}

double host_sum(const std::vector<double>& v) {
    double s = 0.0;
    for (const double x : v) s += x;
    return s;
}

// rabitq.cpp's scan over the listed events.
int host_best_prefix(const ScanCase& c, double abs_sum) {
    double ip = 0.5 * abs_sum, nn = 0.25 * kD, best = ip * ip / nn;
    std::vector<int> steps(kD, 0);
    int best_len = 0;
    for (std::size_t i = 0; i < c.tags.size(); ++i) {
        const int j = c.tags[i] >> 8;
        ip += c.abs_e[j];
        nn += 2.0 * steps[j] + 2.0;
        ++steps[j];
        if (ip * ip > best * nn) {
            best = ip * ip / nn;
            best_len = static_cast<int>(i) + 1;
        }
    }
    return best_len;
}

enum class Kind { kRabitqLike, kEqual, kTwoLevels, kSmallIntegers, kWide, kTiny };

std::vector<double> residuals(Kind kind, std::mt19937_64& gen) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<double> a(kD);
    for (int j = 0; j < kD; ++j) {
        const float x = normal(gen) / std::sqrt(static_cast<float>(kD));
        const float c = 0.5f * normal(gen) / std::sqrt(static_cast<float>(kD));
        switch (kind) {
            case Kind::kRabitqLike:  // |x - c| of floats, in double
                a[j] = std::fabs(static_cast<double>(x) - c);
                break;
            case Kind::kEqual:
                a[j] = 0.25;
                break;
            case Kind::kTwoLevels:
                a[j] = gen() % 2 ? 0.25 : 0.5;
                break;
            case Kind::kSmallIntegers:
                a[j] = static_cast<double>(gen() % 4);  // zeros too: no events
                break;
            case Kind::kWide:  // half the coordinates 2^-60 times the others
                a[j] = std::fabs(static_cast<double>(x) - c) * (j % 2 ? 0x1p-60 : 1.0);
                break;
            case Kind::kTiny:  // below float's normal range: the sort's keys are t itself
                a[j] = std::fabs(static_cast<double>(x) - c) * 0x1p-130;
                break;
        }
    }
    return a;
}

void check_kind(Kind kind, int bits, int cases, uint64_t seed, double min_warp_share,
                double max_warp_share) {
    const int m = 1 << (bits - 1), max_events = kD * (m - 1);
    std::mt19937_64 gen(seed);
    std::vector<ScanCase> all(cases);
    std::vector<double> abs_e;
    std::vector<uint16_t> tags(static_cast<std::size_t>(cases) * max_events, 0);
    std::vector<int> counts;
    for (int k = 0; k < cases; ++k) {
        all[k].abs_e = residuals(kind, gen);
        all[k].tags = sorted_events(all[k].abs_e, m);
        abs_e.insert(abs_e.end(), all[k].abs_e.begin(), all[k].abs_e.end());
        std::copy(all[k].tags.begin(), all[k].tags.end(),
                  tags.begin() + static_cast<std::ptrdiff_t>(k) * max_events);
        counts.push_back(static_cast<int>(all[k].tags.size()));
    }
    const DeviceBuffer<double> d_abs(abs_e);
    const DeviceBuffer<uint16_t> d_tags(tags);
    const DeviceBuffer<int> d_counts(counts);
    DeviceBuffer<double> d_q(static_cast<std::size_t>(cases) * max_events), d_sums(cases);
    DeviceBuffer<int> d_warp(cases), d_lane(cases);
    scan_kernel<<<cases, 32>>>(d_abs.get(), d_tags.get(), d_counts.get(), m, max_events, d_q.get(),
                               d_warp.get(), d_lane.get(), d_sums.get());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<int> warp = d_warp.download(), lane = d_lane.download();
    const std::vector<double> sums = d_sums.download();
    int taken = 0;
    for (int k = 0; k < cases; ++k) {
        const double abs_sum = host_sum(all[k].abs_e);
        ASSERT_EQ(sums[k], abs_sum) << "case " << k;
        const int want = host_best_prefix(all[k], abs_sum);
        ASSERT_EQ(lane[k], want) << "case " << k;
        if (warp[k] >= 0) {
            ASSERT_EQ(warp[k], want) << "case " << k << " of " << all[k].tags.size() << " events";
            ++taken;
        } else {
            ASSERT_EQ(warp[k], -1) << "case " << k;
        }
    }
    const double share = static_cast<double>(taken) / cases;
    EXPECT_GE(share, min_warp_share);
    EXPECT_LE(share, max_warp_share);
}

// rb_sorted_events of case blockIdx.x (one warp): its event count and tags in order.
__global__ void sort_kernel(const double* abs_e, const double* t_max, int m, int max_events,
                            uint16_t* tags_out, int* counts) {
    extern __shared__ __align__(16) uint8_t smem[];
    auto* keys = reinterpret_cast<unsigned long long*>(smem);
    auto* cursor = reinterpret_cast<int*>(keys + max_events);
    auto* staged_abs = reinterpret_cast<double*>(cursor + max_events + 2);  // 8-byte aligned
    auto* tags = reinterpret_cast<uint16_t*>(staged_abs + kD);
    const int k = static_cast<int>(blockIdx.x), lane = static_cast<int>(threadIdx.x);
    double a[kC];
    for (int c = 0; c < kC; ++c) {
        a[c] = abs_e[static_cast<size_t>(k) * kD + 32 * c + lane];
        staged_abs[32 * c + lane] = a[c];
    }
    __syncwarp();
    const int n = codec::rb_sorted_events<kC>(a, staged_abs, m, t_max[k], keys, tags, cursor, lane);
    for (int i = lane; i < n; i += 32) tags_out[static_cast<size_t>(k) * max_events + i] = tags[i];
    if (lane == 0) counts[k] = n;
}

// The host's order of the events with s <= t_max |e_j| (the kernel's test).
std::vector<uint16_t> events_below(const std::vector<double>& abs_e, int m, double t_max) {
    std::vector<std::tuple<double, int, int>> ev;
    for (int j = 0; j < kD; ++j)
        for (int s = 1; s < m && s <= t_max * abs_e[j]; ++s) ev.emplace_back(s / abs_e[j], j, s);
    std::sort(ev.begin(), ev.end());
    std::vector<uint16_t> tags;
    for (const auto& [t, j, s] : ev) tags.push_back(static_cast<uint16_t>(j << 8 | s));
    return tags;
}

void check_sort(const std::vector<std::vector<double>>& cases, const std::vector<double>& t_max,
                int m) {
    const int max_events = kD * (m - 1), n_cases = static_cast<int>(cases.size());
    std::vector<double> abs_e;
    for (const auto& c : cases) abs_e.insert(abs_e.end(), c.begin(), c.end());
    const DeviceBuffer<double> d_abs(abs_e), d_t(t_max);
    DeviceBuffer<uint16_t> d_tags(static_cast<std::size_t>(n_cases) * max_events);
    DeviceBuffer<int> d_counts(n_cases);
    const size_t smem = static_cast<size_t>(max_events) * 10 + 4 * (max_events + 2) + 8 * kD + 16;
    sort_kernel<<<n_cases, 32, smem>>>(d_abs.get(), d_t.get(), m, max_events, d_tags.get(),
                                       d_counts.get());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<uint16_t> tags = d_tags.download();
    const std::vector<int> counts = d_counts.download();
    for (int k = 0; k < n_cases; ++k) {
        const std::vector<uint16_t> want = events_below(cases[k], m, t_max[k]);
        ASSERT_EQ(counts[k], static_cast<int>(want.size())) << "case " << k;
        const auto* got = tags.data() + static_cast<std::size_t>(k) * max_events;
        ASSERT_TRUE(std::equal(want.begin(), want.end(), got)) << "case " << k;
    }
}

TEST(RabitqScanDevice, EventsSortLikeTheHost) {
    SKIP_WITHOUT_DEVICE();
    for (const int bits : {2, 3, 4}) {
        const int m = 1 << (bits - 1);
        std::mt19937_64 gen(61 + bits);
        std::vector<std::vector<double>> cases;
        std::vector<double> t_max;
        for (const Kind kind : {Kind::kRabitqLike, Kind::kEqual, Kind::kTwoLevels,
                                Kind::kSmallIntegers, Kind::kWide, Kind::kTiny})
            for (int i = 0; i < (kind == Kind::kRabitqLike ? 1024 : 64); ++i) {
                cases.push_back(residuals(kind, gen));
                const double sum = host_sum(cases.back());
                t_max.push_back(sum > 0.0 ? (m - 0.5) * kD / sum * (1.0 + 1e-9) : 0.0);
            }
        SCOPED_TRACE(bits);
        check_sort(cases, t_max, m);
    }
}

// The kernel's bucket of event s of |e| = a (rb_sorted_events' estimate), n events over t_max.
long long estimate_bucket(double a, int s, int n, double t_max) {
    const double r0 = 1.0f / static_cast<float>(a);
    const double est = s * std::fma(r0, std::fma(-a, r0, 1.0), r0);
    return std::min(static_cast<long long>(est * (n / t_max)), static_cast<long long>(n - 1));
}

// Two events whose estimates cross a bucket edge in the wrong order: |e| = a_lo < a_hi (so
// t_lo > t_hi) around a point where a's float (so the estimate's reciprocal) changes, with
// t_max putting an edge between their estimates, the other 126 coordinates well inside.
TEST(RabitqScanDevice, EventsInSwappedBucketsStillSort) {
    SKIP_WITHOUT_DEVICE();
    std::mt19937_64 gen(71);
    std::uniform_real_distribution<float> unit(0.5f, 2.0f);
    constexpr int kN = kD;  // m = 2: one event a coordinate, every |e| >= 1 / t_max
    for (int tries = 0; tries < 1000; ++tries) {
        const float f = unit(gen);  // a_lo, a_hi: the doubles either side of f's midpoint
        const double mid = (static_cast<double>(f) + std::nextafter(f, 4.0f)) / 2;
        const double a_lo = std::nextafter(mid, 0.0), a_hi = std::nextafter(mid, 4.0);
        // The estimates of 1 / a: the higher must be a_hi's.
        const auto est = [](double a) {
            const double r0 = 1.0f / static_cast<float>(a);
            return std::fma(r0, std::fma(-a, r0, 1.0), r0);
        };
        if (!(est(a_hi) > est(a_lo))) continue;
        // An edge k = n / 2 between them: t_max = n / per_t, per_t = k / (the estimates' middle).
        double t_max = kN / (kN / 2 / ((est(a_lo) + est(a_hi)) / 2));
        if (!(estimate_bucket(a_lo, 1, kN, t_max) < estimate_bucket(a_hi, 1, kN, t_max))) continue;
        ASSERT_GT(1.0 / a_lo, 1.0 / a_hi);
        std::vector<double> a(kD);
        std::uniform_real_distribution<double> inside(1.2 / t_max, 4.0 / t_max);
        for (double& x : a) x = inside(gen);
        a[5] = a_lo;
        a[70] = a_hi;
        ASSERT_EQ(events_below(a, 2, t_max).size(), static_cast<std::size_t>(kN));
        check_sort({a}, {t_max}, 2);
        return;
    }
    FAIL() << "no pair of events in swapped buckets found";
}

// Two events whose t differ by about 2^-40 of t, more than the estimate's error but within the
// sort keys' (their values keep 36 of the estimate's 52 mantissa bits), in one bucket: the keys
// tie on value and order by tag, the reverse of t here, so the pair check must find t itself out
// of order and lane 0's sort put them right.
TEST(RabitqScanDevice, EventsWithinTheKeysErrorStillSort) {
    SKIP_WITHOUT_DEVICE();
    std::mt19937_64 gen(73);
    std::uniform_real_distribution<double> unit(0.6, 1.9);
    const auto key_value = [](double a) {  // the kernel's key value of event s = 1 of |e| = a
        const double r0 = 1.0f / static_cast<float>(a);
        double est = std::fma(r0, std::fma(-a, r0, 1.0), r0);
        uint64_t bits;
        std::memcpy(&bits, &est, sizeof bits);
        bits &= ~0xffffull;
        std::memcpy(&est, &bits, sizeof est);
        return est;
    };
    for (int tries = 0; tries < 1000; ++tries) {
        const double a_hi = unit(gen), a_lo = a_hi * (1.0 - 0x1p-40);  // t_lo > t_hi
        if (key_value(a_lo) != key_value(a_hi)) continue;
        const double t_max = 2.0;  // one event a coordinate (m = 2): every a is over 1 / t_max
        if (estimate_bucket(a_lo, 1, kD, t_max) != estimate_bucket(a_hi, 1, kD, t_max)) continue;
        std::vector<double> a(kD);
        std::uniform_real_distribution<double> inside(0.55, 1.95);
        for (double& x : a) x = inside(gen);
        a[5] = a_lo;  // the lower tag on the larger t
        a[70] = a_hi;
        ASSERT_EQ(events_below(a, 2, t_max).size(), static_cast<std::size_t>(kD));
        check_sort({a}, {t_max}, 2);
        return;
    }
    FAIL() << "no pair of events with tied sort keys found";
}

// rb_scale of case blockIdx.x (one warp): f = ||e||^2 / xe from the warp's tree of the terms.
__global__ void scale_kernel(const double* abs_e, const double* xe, float* f) {
    __shared__ __align__(16) double terms[kD];
    const int k = static_cast<int>(blockIdx.x), lane = static_cast<int>(threadIdx.x);
    double a[kC];
    double tree = 0.0;
    for (int c = 0; c < kC; ++c) {
        a[c] = abs_e[static_cast<size_t>(k) * kD + 32 * c + lane];
        tree += a[c] * a[c];
    }
    const float got = codec::rb_scale<kC>(warp_sum(tree), xe[k], a, terms, kD, lane);
    if (lane == 0) f[k] = got;
}

// f as rabitq.cpp rounds it: the terms e_j^2 added in j order, divided by xe, to float.
float host_scale(const std::vector<double>& abs_e, double xe) {
    double norm2 = 0.0;
    for (const double a : abs_e) norm2 += a * a;
    return static_cast<float>(norm2 / xe);
}

// Rabitq-like residuals with random <x_bar, e>, and residuals (1, b, 0, ...) with xe putting
// ||e||^2 / xe on a float's rounding edge, within the tree's bounds (checked here: the sums of two
// terms are the same in every order), so rb_scale adds the terms in order: f must be the host's.
TEST(RabitqScanDevice, ScaleFromTheTreeIsTheHosts) {
    SKIP_WITHOUT_DEVICE();
    std::mt19937_64 gen(81);
    std::uniform_real_distribution<double> spread(0.3, 3.0);
    std::vector<std::vector<double>> cases;
    std::vector<double> xe;
    int edges = 0;
    for (int i = 0; i < 512; ++i) {
        cases.push_back(residuals(Kind::kRabitqLike, gen));
        xe.push_back(host_sum(cases.back()) * spread(gen));
    }
    for (int i = 0; i < 512; ++i) {
        std::vector<double> a(kD, 0.0);
        a[i % kD] = 1.0;
        a[(i * 7 + 1) % kD] = std::ldexp(spread(gen), -12);
        const double norm2 = a[i % kD] * a[i % kD] + a[(i * 7 + 1) % kD] * a[(i * 7 + 1) % kD];
        const auto low = static_cast<float>(spread(gen));  // the edge between low and the next
        const double edge = (static_cast<double>(low) + std::nextafter(low, 8.0f)) / 2;
        const double x = norm2 / edge, slack = (kD + 8) * 0x1p-51 * norm2;
        edges += static_cast<float>((norm2 - slack) / x) != static_cast<float>((norm2 + slack) / x);
        cases.push_back(a);
        xe.push_back(x);
    }
    EXPECT_GE(edges, 400);  // most of them take the ordered sum
    std::vector<double> abs_e;
    for (const auto& c : cases) abs_e.insert(abs_e.end(), c.begin(), c.end());
    const DeviceBuffer<double> d_abs(abs_e), d_xe(xe);
    DeviceBuffer<float> d_f(cases.size());
    scale_kernel<<<static_cast<unsigned>(cases.size()), 32>>>(d_abs.get(), d_xe.get(), d_f.get());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> f = d_f.download();
    for (std::size_t k = 0; k < cases.size(); ++k)
        EXPECT_EQ(f[k], host_scale(cases[k], xe[k])) << "case " << k;
}

TEST(RabitqScanDevice, RabitqLikeResidualsMostlyTakeTheWarpScan) {
    SKIP_WITHOUT_DEVICE();
    for (const int bits : {2, 3, 4}) check_kind(Kind::kRabitqLike, bits, 4096, 11 + bits, 0.9, 1.0);
}

TEST(RabitqScanDevice, TiedResidualsAgreeWithTheSequentialScan) {
    SKIP_WITHOUT_DEVICE();
    for (const int bits : {2, 3, 4}) {
        check_kind(Kind::kEqual, bits, 64, 21 + bits, 0.0, 1.0);
        check_kind(Kind::kTwoLevels, bits, 1024, 31 + bits, 0.0, 1.0);
        check_kind(Kind::kSmallIntegers, bits, 1024, 41 + bits, 0.0, 1.0);
    }
}

TEST(RabitqScanDevice, ResidualsSpreadOver2To60DeclineTheWarpScan) {
    SKIP_WITHOUT_DEVICE();
    for (const int bits : {2, 3, 4}) check_kind(Kind::kWide, bits, 512, 51 + bits, 0.0, 0.0);
}

}  // namespace
}  // namespace veloxquant::cuda
