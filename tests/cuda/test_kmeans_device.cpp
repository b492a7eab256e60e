// kmeans_on_device against the CPU's kmeans() (core/kmeans.h): the same centroids, assignment
// and objective history bit for bit, on Gaussian sets of several shapes, on clustered sets, on
// small integer grids (ties, duplicates), and the paths it leaves to the host.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "core/kmeans.h"
#include "cuda/kmeans_device.h"
#include "cuda_test_helpers.h"

namespace {

using veloxquant::KMeansInit;
using veloxquant::KMeansOptions;
using veloxquant::KMeansResult;
using veloxquant::cuda::kmeans_on_device;

std::vector<uint64_t> seeds_for(int sets, uint64_t base) {
    std::vector<uint64_t> s(sets);
    for (int i = 0; i < sets; ++i) s[i] = base * 1000003 + i * 7919;
    return s;
}

// Runs both and compares every set; returns the device call's host runs.
int expect_same_as_cpu(const std::vector<float>& points, int sets, int n, int d, int k,
                       const std::vector<uint64_t>& seeds, const KMeansOptions& options = {}) {
    int host_runs = -1;
    const std::vector<KMeansResult> got =
        kmeans_on_device(points.data(), sets, n, d, k, seeds.data(), options, nullptr, &host_runs);
    EXPECT_EQ(got.size(), static_cast<std::size_t>(sets));
    for (int s = 0; s < sets && s < static_cast<int>(got.size()); ++s) {
        const KMeansResult want = veloxquant::kmeans(
            points.data() + static_cast<std::size_t>(s) * n * d, n, d, k, seeds[s], options);
        SCOPED_TRACE("set " + std::to_string(s) + " of n=" + std::to_string(n) +
                     " d=" + std::to_string(d) + " k=" + std::to_string(k));
        EXPECT_EQ(got[s].k, want.k);
        EXPECT_EQ(got[s].centroids.size(), want.centroids.size());
        if (got[s].centroids.size() != want.centroids.size()) continue;
        EXPECT_EQ(0, std::memcmp(got[s].centroids.data(), want.centroids.data(),
                                 want.centroids.size() * sizeof(float)));
        EXPECT_EQ(got[s].assignment, want.assignment);
        EXPECT_EQ(got[s].objective_history, want.objective_history);
    }
    return host_runs;
}

TEST(KMeansDevice, GaussianSetsMatchTheCpuBitForBit) {
    SKIP_WITHOUT_DEVICE();
    struct Shape {
        int sets, n, d, k;
    };
    // rabitq's first append (8 heads, 2048 rows, d=128, 64 clusters), k above n (k = n), one
    // point, one cluster.
    for (const Shape s : {Shape{8, 2048, 128, 64}, Shape{3, 500, 64, 16}, Shape{2, 37, 8, 50},
                          Shape{1, 1, 8, 3}, Shape{2, 100, 32, 1}, Shape{2, 301, 96, 9}}) {
        const std::vector<float> x =
            vqtest::randn(static_cast<std::size_t>(s.sets) * s.n * s.d, s.n * 31 + s.d);
        EXPECT_EQ(0, expect_same_as_cpu(x, s.sets, s.n, s.d, s.k, seeds_for(s.sets, s.k)));
    }
    // A head dim that is not a multiple of 8 runs on the host.
    const std::vector<float> odd = vqtest::randn(2 * 301 * 13, 4);
    EXPECT_EQ(2, expect_same_as_cpu(odd, 2, 301, 13, 9, seeds_for(2, 9)));
}

TEST(KMeansDevice, ClusteredSetsAndIterationLimitsMatchTheCpu) {
    SKIP_WITHOUT_DEVICE();
    const int sets = 4, n = 1200, d = 24, k = 12;
    std::mt19937_64 gen(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(static_cast<std::size_t>(sets) * n * d);
    std::vector<float> centres(static_cast<std::size_t>(sets) * 10 * d);
    for (float& c : centres) c = 8.0f * normal(gen);
    for (int s = 0; s < sets; ++s)
        for (int i = 0; i < n; ++i)
            for (int j = 0; j < d; ++j)
                x[(static_cast<std::size_t>(s) * n + i) * d + j] =
                    centres[(static_cast<std::size_t>(s) * 10 + i % 10) * d + j] +
                    0.3f * normal(gen);
    const std::vector<uint64_t> seeds = seeds_for(sets, 3);
    EXPECT_EQ(0, expect_same_as_cpu(x, sets, n, d, k, seeds));
    for (const int iterations : {0, 1, 3}) {
        KMeansOptions o;
        o.max_iterations = iterations;
        o.tolerance = 0.0;  // the cap or no change ends the loop
        EXPECT_EQ(0, expect_same_as_cpu(x, sets, n, d, k, seeds, o));
    }
    KMeansOptions loose;
    loose.tolerance = 0.05;
    EXPECT_EQ(0, expect_same_as_cpu(x, sets, n, d, k, seeds, loose));
}

// Points on a small integer grid: equal distances (ties to the lower index) and duplicate points,
// where a set may also run out of distinct points while seeding or empty a cluster (those go to
// the host). 300 sets, all equal to the CPU's.
TEST(KMeansDevice, IntegerGridsWithTiesAndDuplicatesMatchTheCpu) {
    SKIP_WITHOUT_DEVICE();
    const int sets = 300, n = 24, d = 8, k = 7;
    std::mt19937_64 gen(11);
    std::uniform_int_distribution<int> coord(0, 3);
    std::vector<float> x(static_cast<std::size_t>(sets) * n * d, 0.0f);  // a 4 x 4 grid in 8-D
    for (std::size_t row = 0; row < x.size() / d; ++row)
        for (int j = 0; j < 2; ++j) x[row * d + j] = static_cast<float>(coord(gen));
    const int host_runs = expect_same_as_cpu(x, sets, n, d, k, seeds_for(sets, 17));
    RecordProperty("host_runs", host_runs);
    EXPECT_LT(host_runs, sets / 2);  // most sets stay on the device
}

TEST(KMeansDevice, IdenticalPointsAndRandomSeedingRunOnTheHost) {
    SKIP_WITHOUT_DEVICE();
    const std::vector<float> same(2 * 40 * 8, 1.5f);
    EXPECT_EQ(2, expect_same_as_cpu(same, 2, 40, 8, 4, seeds_for(2, 1)));
    const std::vector<float> x = vqtest::randn(3 * 200 * 16, 9);
    KMeansOptions random;
    random.init = KMeansInit::kRandomDistinct;
    EXPECT_EQ(3, expect_same_as_cpu(x, 3, 200, 16, 8, seeds_for(3, 2), random));
}

TEST(KMeansDevice, BadSizesThrowAsTheCpuDoes) {
    SKIP_WITHOUT_DEVICE();
    const std::vector<float> x(64, 0.5f);
    const uint64_t seed = 1;
    EXPECT_THROW(kmeans_on_device(x.data(), 1, 8, 8, 0, &seed, {}, nullptr), std::invalid_argument);
    EXPECT_THROW(kmeans_on_device(x.data(), 1, 0, 8, 2, &seed, {}, nullptr), std::invalid_argument);
    KMeansOptions bad;
    bad.max_iterations = -1;
    EXPECT_THROW(kmeans_on_device(x.data(), 1, 8, 8, 2, &seed, bad, nullptr),
                 std::invalid_argument);
    EXPECT_THROW(kmeans_on_device(x.data(), -1, 8, 8, 2, &seed, {}, nullptr),
                 std::invalid_argument);
    EXPECT_TRUE(kmeans_on_device(x.data(), 0, 8, 8, 2, &seed, {}, nullptr).empty());
}

}  // namespace
