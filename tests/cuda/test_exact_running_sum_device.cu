// exact_running_sums (cuda/exact_running_sum.cuh): a CTA's running double sums of non-negative
// floats, which must equal one thread's sequential sums (s_i = s_{i-1} + x_i in double, as the
// CPU's ordered_sum adds them) bit for bit wherever it answers. On a GPU, over CTA sizes and
// lengths: it must answer (and match) on squared distances of Gaussian points and on small
// integers, subnormals included; decline a negative term, Inf and NaN; decline where a prefix needs
// more than 53 bits (checked on the host with 128-bit integers to be a case where the sequential
// sum rounds); and on exponents spread over the float range either decline or match. Skips without
// a device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/exact_running_sum.cuh"
#include "cuda_test_helpers.h"

namespace veloxquant::cuda {
namespace {

using vqtest::DeviceBuffer;

// Case blockIdx.x: x [n] staged in shared memory; running [n], total and the answer out.
template <int kThreads>
__global__ void running_sums_kernel(const float* xs, int n, double* running, double* totals,
                                    int* answered) {
    extern __shared__ double smem[];
    double* sums = smem;
    float* x = reinterpret_cast<float*>(smem + n);
    const int c = static_cast<int>(blockIdx.x);
    for (int i = threadIdx.x; i < n; i += kThreads) {
        x[i] = xs[static_cast<size_t>(c) * n + i];
        sums[i] = -1.0;
    }
    __syncthreads();
    double total = -1.0;
    const bool ok = exact_running_sums<kThreads>(x, n, sums, &total);
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kThreads)
        running[static_cast<size_t>(c) * n + i] = sums[i];
    if (threadIdx.x == 0) {
        totals[c] = total;
        answered[c] = ok ? 1 : 0;
    }
}

struct Result {
    std::vector<double> running, totals;
    std::vector<int> answered;
};

template <int kThreads>
Result run(const std::vector<float>& xs, int cases, int n) {
    const DeviceBuffer<float> d_x(xs);
    DeviceBuffer<double> d_running(static_cast<size_t>(cases) * n), d_totals(cases);
    DeviceBuffer<int> d_answered(cases);
    const size_t smem = static_cast<size_t>(n) * (sizeof(double) + sizeof(float));
    running_sums_kernel<kThreads><<<cases, kThreads, smem>>>(d_x.get(), n, d_running.get(),
                                                             d_totals.get(), d_answered.get());
    check_cuda(cudaDeviceSynchronize(), "running_sums_kernel");
    return {d_running.download(), d_totals.download(), d_answered.download()};
}

// One thread's sums, as kmeans_device.cu's ordered_sum (and the CPU's ordered_sum) take them.
std::vector<double> sequential(const float* x, int n) {
    std::vector<double> s(n);
    double sum = 0.0;
    for (int i = 0; i < n; ++i) s[i] = sum += x[i];
    return s;
}

// Checks every answered case against the sequential sums; returns how many answered.
int expect_answers_match(const Result& r, const std::vector<float>& xs, int cases, int n,
                         const std::string& what) {
    int answered = 0;
    for (int c = 0; c < cases; ++c) {
        if (!r.answered[c]) continue;
        ++answered;
        const std::vector<double> want = sequential(xs.data() + static_cast<size_t>(c) * n, n);
        SCOPED_TRACE(what + ", case " + std::to_string(c) + " of n=" + std::to_string(n));
        EXPECT_EQ(0, std::memcmp(&r.running[static_cast<size_t>(c) * n], want.data(),
                                 sizeof(double) * n));
        EXPECT_EQ(0, std::memcmp(&r.totals[c], &want[n - 1], sizeof(double)));
    }
    return answered;
}

template <int kThreads>
void check_sizes() {
    SKIP_WITHOUT_DEVICE();
    std::mt19937_64 gen(kThreads);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (const int n : {1, 7, 31, 256, 1000, 2048, 3001}) {
        const int cases = 24;
        // Squared distances of 32-D Gaussian points to a seed, some zero (points on seeds).
        std::vector<float> dist(static_cast<size_t>(cases) * n);
        for (size_t i = 0; i < dist.size(); ++i) {
            float s = 0.0f;
            for (int j = 0; j < 32; ++j) {
                const float t = normal(gen) - normal(gen);
                s += t * t;
            }
            dist[i] = i % 97 == 5 ? 0.0f : s;
        }
        const Result a = run<kThreads>(dist, cases, n);
        EXPECT_EQ(cases, expect_answers_match(a, dist, cases, n, "distances"));
        // Small integers (and all zeros in case 0): exact in every order.
        std::vector<float> ints(dist.size());
        std::uniform_int_distribution<int> small(0, 1000);
        for (size_t i = 0; i < ints.size(); ++i)
            ints[i] = i < static_cast<size_t>(n) ? 0.0f : static_cast<float>(small(gen));
        const Result b = run<kThreads>(ints, cases, n);
        EXPECT_EQ(cases, expect_answers_match(b, ints, cases, n, "integers"));
        for (int c = 0; c < cases; ++c) EXPECT_EQ(b.totals[c] == 0.0, c == 0);
        // Exponents over the float range (2^-140 .. 2^120): decline or match.
        std::vector<float> spread(dist.size());
        std::uniform_real_distribution<float> e(-140.0f, 120.0f);
        for (float& v : spread) v = std::ldexp(1.0f + 0.5f * std::abs(normal(gen)), e(gen));
        expect_answers_match(run<kThreads>(spread, cases, n), spread, cases, n, "spread");
        // Subnormals and the smallest normals (2^-140 .. 2^-124): spans narrow enough to answer.
        std::vector<float> tiny(dist.size());
        std::uniform_real_distribution<float> low(-140.0f, -124.0f);
        for (float& v : tiny) v = std::ldexp(1.0f + 0.5f * std::abs(normal(gen)), low(gen));
        EXPECT_EQ(cases,
                  expect_answers_match(run<kThreads>(tiny, cases, n), tiny, cases, n, "tiny"));
    }
}

TEST(ExactRunningSum, AnswersAndMatchesOneThreadAt1024Threads) {
    check_sizes<1024>();
}

TEST(ExactRunningSum, AnswersAndMatchesOneThreadAt256Threads) {
    check_sizes<256>();
}

TEST(ExactRunningSum, DeclinesBadTermsAndRoundingPrefixes) {
    SKIP_WITHOUT_DEVICE();
    const int n = 2048, cases = 4;
    std::mt19937_64 gen(3);
    std::uniform_real_distribution<float> unit(1.0f, 2.0f);
    std::vector<float> xs(static_cast<size_t>(cases) * n);
    for (float& v : xs) v = unit(gen);
    xs[0 * n + 100] = -1.0f;
    xs[1 * n + 2047] = std::numeric_limits<float>::infinity();
    xs[2 * n + 0] = std::nanf("");
    // Case 3: 1 + 2^-23 (its lowest bit 2^-23) among 2047 terms near 2^20: the exact prefixes
    // reach 2^31 with that bit set, 55 significant bits, so the sequential sum rounds.
    float* c3 = &xs[3 * n];
    c3[0] = 1.0f + std::ldexp(1.0f, -23);
    for (int i = 1; i < n; ++i) c3[i] = std::ldexp(unit(gen), 20);
    // The host's 128-bit integer prefixes (units of 2^-23) confirm that a partial sum rounds.
    unsigned __int128 exact = 0;
    bool rounds = false;
    double sum = 0.0;
    for (int i = 0; i < n; ++i) {
        int e = 0;
        const float m = std::frexp(c3[i], &e);  // c3[i] = m 2^e, m in [0.5, 1)
        exact += static_cast<unsigned __int128>(std::ldexp(m, 24)) << (e - 24 + 23);
        sum += c3[i];
        rounds = rounds || std::ldexp(static_cast<long double>(exact), -23) != sum;
    }
    ASSERT_TRUE(rounds);
    const Result r = run<1024>(xs, cases, n);
    for (int c = 0; c < cases; ++c) EXPECT_EQ(r.answered[c], 0) << "case " << c;
}

}  // namespace
}  // namespace veloxquant::cuda
