// Seeded k-means: recovers separated clusters, the objective never rises, results depend only
// on the seed (not on the thread count), k > n and duplicate points are handled.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "core/cpu_isa.h"
#include "core/kmeans.h"
#include "core/rng.h"

namespace veloxquant {
namespace {

struct Blobs {
    std::vector<float> points;   // [n][d]
    std::vector<int> label;      // true blob of each point
    std::vector<float> centers;  // [blobs][d]
};

// `blobs` centres drawn N(0, spread_centers^2), points = centre + N(0, noise^2), shuffled.
Blobs make_blobs(int blobs, int per_blob, int d, double spread_centers, double noise,
                 uint64_t seed) {
    Rng rng(seed);
    Blobs b;
    b.centers.resize(static_cast<std::size_t>(blobs) * d);
    for (auto& v : b.centers) v = static_cast<float>(spread_centers * rng.normal());
    const int n = blobs * per_blob;
    std::vector<int> order(n);
    for (int i = 0; i < n; ++i) order[i] = i % blobs;
    for (int i = n - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
    for (int i = 0; i < n; ++i) {
        b.label.push_back(order[i]);
        for (int j = 0; j < d; ++j)
            b.points.push_back(b.centers[order[i] * d + j] +
                               static_cast<float>(noise * rng.normal()));
    }
    return b;
}

TEST(KMeans, RecoversSeparatedClusters) {
    const int blobs = 8, d = 16;
    const Blobs b = make_blobs(blobs, 100, d, 10.0, 0.3, 11);
    const int n = static_cast<int>(b.label.size());
    const KMeansResult r = kmeans(b.points.data(), n, d, blobs, 2024);
    ASSERT_EQ(r.k, blobs);
    // Each found cluster holds exactly one blob, and the map blob -> cluster is a bijection.
    std::map<int, std::set<int>> blobs_of_cluster;
    for (int i = 0; i < n; ++i) blobs_of_cluster[r.assignment[i]].insert(b.label[i]);
    ASSERT_EQ(blobs_of_cluster.size(), static_cast<std::size_t>(blobs));
    std::set<int> seen;
    for (const auto& [cluster, set] : blobs_of_cluster) {
        ASSERT_EQ(set.size(), 1u) << "cluster " << cluster << " mixes blobs";
        seen.insert(*set.begin());
        // Centroid = blob mean, within a few noise standard errors of the true centre.
        const int blob = *set.begin();
        for (int j = 0; j < d; ++j)
            EXPECT_NEAR(r.centroids[cluster * d + j], b.centers[blob * d + j], 0.15);
    }
    EXPECT_EQ(seen.size(), static_cast<std::size_t>(blobs));
}

TEST(KMeans, ObjectiveNeverIncreases) {
    const int n = 3000, d = 8, k = 24;
    Rng rng(5);
    std::vector<float> x(static_cast<std::size_t>(n) * d);
    for (auto& v : x) v = static_cast<float>(rng.normal());
    for (KMeansInit init : {KMeansInit::kPlusPlus, KMeansInit::kRandomDistinct}) {
        KMeansOptions opt;
        opt.max_iterations = 60;
        opt.tolerance = 0.0;
        opt.init = init;
        const KMeansResult r = kmeans(x.data(), n, d, k, 77, opt);
        const auto& h = r.objective_history;
        ASSERT_GE(h.size(), 3u);
        for (std::size_t i = 1; i < h.size(); ++i)
            EXPECT_LE(h[i], h[i - 1] * (1.0 + 1e-6)) << "iteration " << i;
        EXPECT_LT(h.back(), 0.9 * h.front());
        // Reported objective matches the assignment against the final centroids.
        double obj = 0.0;
        for (int i = 0; i < n; ++i) {
            double dd = 0.0;
            for (int j = 0; j < d; ++j) {
                const double t = x[i * d + j] - r.centroids[r.assignment[i] * d + j];
                dd += t * t;
            }
            obj += dd;
        }
        EXPECT_NEAR(obj, r.objective(), 1e-4 * obj);
    }
}

TEST(KMeans, DeterministicBySeedAndThreadCount) {
    const Blobs b = make_blobs(12, 150, 32, 1.0, 1.0, 3);  // overlapping: many iterations
    const int n = static_cast<int>(b.label.size());
    const KMeansResult a = kmeans(b.points.data(), n, 32, 12, 99);
    const KMeansResult again = kmeans(b.points.data(), n, 32, 12, 99);
    EXPECT_EQ(a.centroids, again.centroids);
    EXPECT_EQ(a.assignment, again.assignment);
    EXPECT_EQ(a.objective_history, again.objective_history);
#ifdef _OPENMP
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    const KMeansResult serial = kmeans(b.points.data(), n, 32, 12, 99);
    omp_set_num_threads(std::max(threads, 3));
    const KMeansResult wide = kmeans(b.points.data(), n, 32, 12, 99);
    omp_set_num_threads(threads);
    EXPECT_EQ(a.centroids, serial.centroids);
    EXPECT_EQ(a.centroids, wide.centroids);
    EXPECT_EQ(a.assignment, wide.assignment);
#endif
    const KMeansResult other = kmeans(b.points.data(), n, 32, 12, 100);
    EXPECT_NE(a.centroids, other.centroids);
}

TEST(KMeans, MoreClustersThanPoints) {
    const int n = 5, d = 3;
    Rng rng(8);
    std::vector<float> x(n * d);
    for (auto& v : x) v = static_cast<float>(rng.normal());
    const KMeansResult r = kmeans(x.data(), n, d, 10, 1);
    EXPECT_EQ(r.k, n);
    EXPECT_EQ(r.centroids.size(), static_cast<std::size_t>(n * d));
    EXPECT_EQ(r.objective(), 0.0);
    std::set<std::vector<float>> got, want;
    for (int c = 0; c < n; ++c) got.insert({&r.centroids[c * d], &r.centroids[c * d] + d});
    for (int i = 0; i < n; ++i) want.insert({&x[i * d], &x[i * d] + d});
    EXPECT_EQ(got, want);
}

TEST(KMeans, EmptyClustersAreReseeded) {
    // 3 distinct values, two of them heavily duplicated: random-distinct initialisation often
    // seeds two centroids on equal points, leaving one cluster empty; re-seeding must still
    // reach the zero-objective solution.
    const int d = 2;
    std::vector<float> x;
    for (int i = 0; i < 10; ++i) x.insert(x.end(), {0.0f, 0.0f});
    for (int i = 0; i < 10; ++i) x.insert(x.end(), {5.0f, 0.0f});
    x.insert(x.end(), {0.0f, 9.0f});
    const int n = static_cast<int>(x.size()) / d;
    KMeansOptions opt;
    opt.init = KMeansInit::kRandomDistinct;
    for (uint64_t seed = 0; seed < 40; ++seed) {
        const KMeansResult r = kmeans(x.data(), n, d, 3, seed, opt);
        EXPECT_EQ(r.objective(), 0.0) << "seed " << seed;
        for (float v : r.centroids) EXPECT_TRUE(std::isfinite(v));
    }
    // All points identical and k > 1: no NaN, objective 0.
    std::vector<float> same(20 * d, 1.5f);
    for (KMeansInit init : {KMeansInit::kPlusPlus, KMeansInit::kRandomDistinct}) {
        opt.init = init;
        const KMeansResult r = kmeans(same.data(), 20, d, 4, 3, opt);
        EXPECT_EQ(r.k, 4);
        EXPECT_EQ(r.objective(), 0.0);
        for (float v : r.centroids) EXPECT_EQ(v, 1.5f);
    }
}

TEST(KMeans, NearestCentroidTiesGoLow) {
    const float cents[] = {1.0f, 0.0f, -1.0f, 0.0f, 0.0f, 3.0f};
    const float x[] = {0.0f, 0.0f};
    float dist2 = -1.0f;
    EXPECT_EQ(nearest_centroid(x, cents, 3, 2, &dist2), 0);
    EXPECT_EQ(dist2, 1.0f);
    const float y[] = {0.0f, 2.5f};
    EXPECT_EQ(nearest_centroid(y, cents, 3, 2), 2);
}

// CentroidSearch against nearest_centroid on one kernel set.
void expect_host_search_equals_portable() {
    Rng rng(31);
    for (const int d : {1, 7, 8, 13, 64, 128, 130}) {
        for (const int k : {1, 3, 8, 9, 16, 17, 33, 64}) {
            std::vector<float> centroids(static_cast<std::size_t>(k) * d);
            for (float& v : centroids) v = static_cast<float>(rng.normal()) * 3.0f;
            if (k > 2)  // a duplicate centroid: the tie goes to the lower index
                std::copy_n(centroids.data(), d,
                            centroids.data() + static_cast<std::size_t>(2) * d);
            for (int trial = 0; trial < 50; ++trial) {
                std::vector<float> x(d);
                for (float& v : x) v = static_cast<float>(rng.normal()) * 3.0f;
                if (trial == 0)
                    std::copy_n(centroids.data() + (k - 1) * static_cast<std::size_t>(d), d,
                                x.data());
                float want_d = -1.0f, got_d = -2.0f;
                const int want = nearest_centroid(x.data(), centroids.data(), k, d, &want_d);
                const int got = CentroidSearch(centroids.data(), k, d).nearest(x.data(), &got_d);
                ASSERT_EQ(got, want) << "d " << d << " k " << k << " trial " << trial;
                ASSERT_EQ(std::memcmp(&got_d, &want_d, sizeof(float)), 0)
                    << "d " << d << " k " << k << " trial " << trial;
            }
        }
    }
}

// The host's search on every CPU kernel set finds the centroid and distance the portable one
// (the device codecs' too) finds, bit for bit: dims with and without a tail past a multiple of
// 8, centroid counts around the eight-at-once (AVX2) and sixteen-at-once (AVX-512) blocks, ties
// and exact hits.
TEST(KMeans, HostNearestCentroidEqualsPortable) {
    const std::string start = cpu_isa_name();
    for (const std::string& isa : cpu_isas()) {
        SCOPED_TRACE(isa);
        use_cpu_isa(isa);
        expect_host_search_equals_portable();
    }
    use_cpu_isa(start);
}

TEST(KMeans, InvalidArgumentsThrow) {
    const float x[4] = {0, 1, 2, 3};
    EXPECT_THROW(kmeans(x, 0, 2, 1, 0), std::invalid_argument);
    EXPECT_THROW(kmeans(x, 2, 0, 1, 0), std::invalid_argument);
    EXPECT_THROW(kmeans(x, 2, 2, 0, 0), std::invalid_argument);
    KMeansOptions bad;
    bad.tolerance = -1.0;
    EXPECT_THROW(kmeans(x, 2, 2, 1, 0, bad), std::invalid_argument);
}

}  // namespace
}  // namespace veloxquant
