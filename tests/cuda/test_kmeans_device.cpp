// kmeans_on_device against the CPU's kmeans() (core/kmeans.h): the same centroids, assignment
// and objective history bit for bit, on Gaussian sets of several shapes, on clustered sets, on
// small integer grids (ties, duplicates), on distances too far apart for the exact parallel sums,
// and the paths it leaves to the host; and a batch's first
// append (CudaCodecBatch), whose rabitq sequences train on the device, against each sequence's
// cache alone and the CPU cache.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cache/paged_store.h"
#include "core/kmeans.h"
#include "cuda/codec_batch.h"
#include "cuda/codec_cache.h"
#include "cuda/kmeans_device.h"
#include "cuda_test_helpers.h"
#include "rope_test_keys.h"
#include "veloxquant/caches.h"
#include "veloxquant/factory.h"

namespace {

using veloxquant::KMeansInit;
using veloxquant::KMeansOptions;
using veloxquant::KMeansResult;
using veloxquant::KVCacheConfig;
using veloxquant::cuda::CudaCodecBatch;
using veloxquant::cuda::CudaCodecCache;
using veloxquant::cuda::kmeans_on_device;

std::vector<uint64_t> seeds_for(int sets, uint64_t base) {
    std::vector<uint64_t> s(sets);
    for (int i = 0; i < sets; ++i) s[i] = base * 1000003 + i * 7919;
    return s;
}

// Runs both and compares every set; returns the device call's host runs. from_device: the points
// are uploaded first and given to kmeans_on_device_points.
int expect_same_as_cpu(const std::vector<float>& points, int sets, int n, int d, int k,
                       const std::vector<uint64_t>& seeds, const KMeansOptions& options = {},
                       bool from_device = false) {
    int host_runs = -1;
    std::vector<KMeansResult> got;
    if (from_device) {
        const vqtest::DeviceBuffer<float> on_device(points);
        got = veloxquant::cuda::kmeans_on_device_points(on_device.get(), sets, n, d, k,
                                                        seeds.data(), options, nullptr, &host_runs);
    } else {
        got = kmeans_on_device(points.data(), sets, n, d, k, seeds.data(), options, nullptr,
                               &host_runs);
    }
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

// Points already on the device (what rabitq's device training gives): the same results, and a
// set the host runs (identical points) has its points copied back for it.
TEST(KMeansDevice, PointsOnTheDeviceMatchTheCpuToo) {
    SKIP_WITHOUT_DEVICE();
    const int sets = 4, n = 600, d = 32, k = 16;
    std::vector<float> x = vqtest::randn(static_cast<std::size_t>(sets) * n * d, 21);
    std::fill(x.begin() + 2 * n * d, x.begin() + 3 * n * d, 0.25f);  // set 2: one point, n times
    EXPECT_EQ(1, expect_same_as_cpu(x, sets, n, d, k, seeds_for(sets, 5), {}, true));
    const std::vector<float> wide = vqtest::randn(8 * 2048 * 128, 22);
    EXPECT_EQ(0, expect_same_as_cpu(wide, 8, 2048, 128, 64, seeds_for(8, 64), {}, true));
    const std::vector<float> odd = vqtest::randn(2 * 100 * 12, 23);  // d % 8 != 0: the host's
    EXPECT_EQ(2, expect_same_as_cpu(odd, 2, 100, 12, 5, seeds_for(2, 3), {}, true));
}

// Rows whose norms spread over 10^[-4, 4]: squared distances too far apart for the CTA's exact
// running sums (exact_running_sum.cuh), so the seeding's draws and the objective take the
// sequential sums, and must still equal the CPU's. Device points that are not 16-byte aligned
// (the assignment stages them as float4) run on the host.
TEST(KMeansDevice, WideRangesTakeTheSequentialSumsAndOddAddressesTheHost) {
    SKIP_WITHOUT_DEVICE();
    const int sets = 3, n = 1000, d = 32, k = 20;
    const std::vector<float> wide = vqtest::random_tokens(sets, n, d, 31, 4.0f);
    EXPECT_EQ(0, expect_same_as_cpu(wide, sets, n, d, k, seeds_for(sets, 8)));
    const std::vector<float> x = vqtest::randn(static_cast<std::size_t>(sets) * n * d, 32);
    std::vector<float> shifted(x.size() + 1);
    std::copy(x.begin(), x.end(), shifted.begin() + 1);
    const vqtest::DeviceBuffer<float> on_device(shifted);
    const std::vector<uint64_t> seeds = seeds_for(sets, 9);
    int host_runs = -1;
    const std::vector<KMeansResult> got = veloxquant::cuda::kmeans_on_device_points(
        on_device.get() + 1, sets, n, d, k, seeds.data(), {}, nullptr, &host_runs);
    EXPECT_EQ(host_runs, sets);
    ASSERT_EQ(got.size(), static_cast<std::size_t>(sets));
    for (int s = 0; s < sets; ++s) {
        const KMeansResult want = veloxquant::kmeans(x.data() + static_cast<std::size_t>(s) * n * d,
                                                     n, d, k, seeds[s], {});
        EXPECT_EQ(got[s].centroids, want.centroids);
        EXPECT_EQ(got[s].assignment, want.assignment);
    }
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

std::string file_bytes(const CudaCodecCache& c, const std::string& name) {
    const std::string path = ::testing::TempDir() + name;
    c.save(path);
    std::ifstream in(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::remove(path.c_str());
    return bytes;
}

// A batch's first append trains its fresh rabitq sequences (other seeds; one sequence trained
// before, which does not train again), centred or not, with one k-means shape (64 clusters: the
// uncentred sequences then train in one k-means call) or two (64 and 16: each alone): each
// sequence's cache saves the file its cache alone saves after the same append, and holds the CPU
// cache's pages.
TEST(KMeansDevice, BatchFirstAppendTrainsEachSequenceAsItsCacheAlone) {
    SKIP_WITHOUT_DEVICE();
    const int heads = 3, d = 128, n = 2500, before = 90;
    const std::vector<std::vector<int>> cluster_counts = {{64, 64, 16, 64}, {64, 64, 64, 64}};
    for (const bool centred : {false, true})
        for (const std::vector<int>& counts : cluster_counts) {
            SCOPED_TRACE(std::string(centred ? "centred" : "uncentred") +
                         (counts[2] == 16 ? ", two k-means shapes" : ", one k-means shape"));
            std::vector<KVCacheConfig> configs;
            for (const int clusters : counts) {
                KVCacheConfig c = vqtest::method_config("rabitq", 3, 4, 40 + configs.size());
                c.num_clusters = clusters;
                c.center_keys = centred;
                c.rope_inv_freq = vqtest::rope_freqs(d);
                c.rope_half_split = true;
                configs.push_back(c);
            }
            const int batch = static_cast<int>(configs.size());
            std::vector<std::unique_ptr<veloxquant::KVCache>> cpu;
            std::vector<std::unique_ptr<CudaCodecCache>> solo, joint;
            std::vector<CudaCodecCache*> rows;
            for (int b = 0; b < batch; ++b) {
                cpu.push_back(veloxquant::KVCacheFactory::create(configs[b], heads, d, 4096, 0));
                solo.push_back(std::make_unique<CudaCodecCache>(configs[b], heads, d, 4096));
                joint.push_back(std::make_unique<CudaCodecCache>(configs[b], heads, d, 4096));
                rows.push_back(joint[b].get());
            }
            std::vector<float> keys, values;
            for (int b = 0; b < batch; ++b) {
                const auto k = vqtest::rope_keys(heads, n, d, configs[b].rope_inv_freq, 600 + b,
                                                 2.0 + b, true);
                const auto v =
                    vqtest::randn(static_cast<std::size_t>(heads) * n * d, 700 + b, 0.5f);
                keys.insert(keys.end(), k.begin(), k.end());
                values.insert(values.end(), v.begin(), v.end());
            }
            const std::size_t per = static_cast<std::size_t>(heads) * n * d;
            {  // sequence 3 trains alone first, on the first `before` tokens of another draw
                const auto k =
                    vqtest::rope_keys(heads, before, d, configs[3].rope_inv_freq, 800, 1.0, true);
                vqtest::DeviceBuffer<float> dk(k), dv(k);
                cpu[3]->append(k.data(), k.data(), before);
                solo[3]->append(dk.get(), dv.get(), before, nullptr);
                joint[3]->append(dk.get(), dv.get(), before, nullptr);
            }
            vqtest::DeviceBuffer<float> dk(keys), dv(values);
            CudaCodecBatch().append(rows, dk.get(), dv.get(), n, nullptr);
            for (int b = 0; b < batch; ++b) {
                SCOPED_TRACE("sequence " + std::to_string(b));
                solo[b]->append(dk.get() + b * per, dv.get() + b * per, n, nullptr);
                cpu[b]->append(keys.data() + b * per, values.data() + b * per, n);
                ASSERT_EQ(joint[b]->size(), solo[b]->size());
                EXPECT_TRUE(file_bytes(*joint[b], "vq_joint.vqkv") ==
                            file_bytes(*solo[b], "vq_solo.vqkv"));
                if (centred) continue;  // the device's estimated mean rounds apart from the CPU's
                veloxquant::PagedStore mine(joint[b]->page_layout());
                joint[b]->download(mine);
                const auto& ref =
                    dynamic_cast<veloxquant::QuantizedKVCache&>(*cpu[b]).paged_store();
                for (int p = 0; p * veloxquant::kTokensPerPage < joint[b]->size(); ++p)
                    EXPECT_EQ(0, std::memcmp(mine.page_data(p), ref.page_data(p),
                                             mine.layout().page_bytes))
                        << "page " << p;
            }
        }
}

}  // namespace
