// The outlier side store on the device (CudaCodecCache with config.outlier_observer) against the
// CPU's QuantizedKVCache of the same config, each with its own observer: the same tokens flagged
// after every append, the same records byte for byte (to_host), attention within 1e-3 for prefill
// chunks and decode steps (the flagged tokens skipped in the pages and scored from their records
// in the merge), dequantize with the records' vectors, truncate and reset, files and from_host,
// sliding windows (their evictions drop entries), a failed append leaving the observer as it was,
// and batches of such caches (CudaCodecBatch) against CPU caches sharing an observer. Skips
// without a device.
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cache/outlier_store.h"
#include "cuda/codec_batch.h"
#include "cuda/codec_cache.h"
#include "cuda_test_helpers.h"
#include "veloxquant/caches.h"
#include "veloxquant/factory.h"
#include "veloxquant/observer.h"

namespace veloxquant::cuda {
namespace {

using vqtest::DeviceBuffer;
using vqtest::method_config;
using vqtest::relative_error;

struct OutlierCase {
    std::string name;
    KVCacheConfig config;
    int heads, d;
};

KVCacheConfig with_outliers(KVCacheConfig c, int bits) {
    c.outlier_bits = bits;
    return c;
}

std::vector<OutlierCase> cases() {
    KVCacheConfig centred = method_config("turboquant_rvq", 3, 2, 2);
    centred.center_keys = true;
    return {
        {"tq_int8", with_outliers(method_config("turboquant_rvq", 2, 4, 1), 8), 2, 128},
        {"tq_fp16_d64", with_outliers(method_config("turboquant_rvq", 1, 2, 7), 16), 2, 64},
        {"fp16_int8", with_outliers(method_config("fp16", 4, 16, 3), 8), 2, 64},
        {"rabitq_int8", with_outliers(method_config("rabitq", 3, 4, 4), 8), 2, 64},
        {"qjl_fp16", with_outliers(method_config("qjl", 1, 4, 6), 16), 2, 128},
        {"centred_int8", with_outliers(centred, 8), 2, 128},
    };
}

// The config with an observer of its own (a cache's flags depend on what its observer saw).
KVCacheConfig observed(const KVCacheConfig& c) {
    KVCacheConfig o = c;
    o.outlier_observer = std::make_shared<KeyNormObserver>(3.0, 32);
    return o;
}

// [heads][n][d] Gaussian tokens of norms within a factor of 2, except every 13th token of a head
// (40 times longer) and every 29th (100 times shorter): the observer's outliers.
std::vector<float> tokens_with_outliers(int heads, int n, int d, uint64_t seed) {
    std::vector<float> x = vqtest::random_tokens(heads, n, d, seed, 0.15f);
    for (int h = 0; h < heads; ++h)
        for (int t = 0; t < n; ++t) {
            const uint64_t mark = seed * 7 + static_cast<uint64_t>(h * n + t);
            const float s = mark % 13 == 0 ? 40.0f : mark % 29 == 0 ? 0.01f : 1.0f;
            for (int j = 0; j < d; ++j) x[(static_cast<std::size_t>(h) * n + t) * d + j] *= s;
        }
    return x;
}

std::unique_ptr<QuantizedKVCache> cpu_cache(const KVCacheConfig& config, int heads, int d) {
    auto made = KVCacheFactory::create(config, heads, d, 4096);
    return std::unique_ptr<QuantizedKVCache>(static_cast<QuantizedKVCache*>(made.release()));
}

// The same entries (positions and record bytes) in every head.
void expect_same_entries(const OutlierStore& got, const OutlierStore& want,
                         const std::string& what) {
    ASSERT_EQ(got.total(), want.total()) << what;
    for (int h = 0; h < want.num_heads(); ++h) {
        EXPECT_EQ(got.positions(h), want.positions(h)) << what << ", head " << h;
        EXPECT_EQ(got.records(h), want.records(h)) << what << ", head " << h;
    }
}

void expect_same_attention(CudaCodecCache& gpu, const KVCache& cpu, int hq, int n, bool causal,
                           uint64_t seed, const std::string& what) {
    const int d = gpu.head_dim();
    const auto q = vqtest::randn(static_cast<std::size_t>(hq) * n * d, seed, 1.0f);
    std::vector<float> ref(q.size());
    cpu.attend(q.data(), hq, n, ref.data(), 0.125f, causal);
    DeviceBuffer<float> dq(q), dout(q.size());
    gpu.attend(dq.get(), hq, n, dout.get(), 0.125f, causal, nullptr);
    EXPECT_LE(relative_error(dout.download(), ref), 1e-3) << what;
}

// Appends n tokens with outliers (and seed's next values) to both caches; names the step.
std::string append_to_both(KVCache& cpu, CudaCodecCache& gpu, int n, uint64_t& seed, int step) {
    const int H = gpu.num_heads(), d = gpu.head_dim();
    const auto keys = tokens_with_outliers(H, n, d, ++seed);
    const auto values = vqtest::random_tokens(H, n, d, ++seed, 0.5f);
    DeviceBuffer<float> dk(keys), dv(values);
    cpu.append(keys.data(), values.data(), n);
    gpu.append(dk.get(), dv.get(), n, nullptr);
    return "step " + std::to_string(step) + ", " + std::to_string(gpu.size()) + " tokens";
}

class CodecOutliers : public ::testing::TestWithParam<OutlierCase> {};

TEST_P(CodecOutliers, FlagAttendAndMoveAsTheCpuCache) {
    SKIP_WITHOUT_DEVICE();
    const OutlierCase& k = GetParam();
    const int H = k.heads, d = k.d, hq = H * 4;
    auto cpu = cpu_cache(observed(k.config), H, d);
    CudaCodecCache gpu(observed(k.config), H, d, 4096);
    uint64_t seed = 10;
    // A long prefill chunk (1200 rows: the wide kernel), a second chunk, a short one (the 8-row
    // kernel), decode steps, another chunk.
    std::vector<int> chunks = {300, 130, 5};
    chunks.insert(chunks.end(), 40, 1);
    chunks.push_back(90);
    int step = 0;
    for (const int n : chunks) {
        const std::string what = append_to_both(*cpu, gpu, n, seed, step++);
        ASSERT_EQ(gpu.outlier_tokens(), cpu->outlier_tokens()) << what;
        expect_same_attention(gpu, *cpu, hq, n, true, ++seed, "causal, " + what);
    }
    ASSERT_GT(gpu.outlier_tokens(), 20) << "the test's tokens must have outliers";
    expect_same_attention(gpu, *cpu, hq, 2, false, ++seed, "non-causal");
    const int size = gpu.size();

    // The records are the CPU encoder's, byte for byte, through to_host; the host cache attends
    // as the CPU cache.
    const auto host = gpu.to_host();
    ASSERT_NE(host->outlier_store(), nullptr);
    expect_same_entries(*host->outlier_store(), *cpu->outlier_store(), "to_host");

    // Dequantize: the flagged tokens from their records, as the CPU's.
    const std::size_t count = static_cast<std::size_t>(H) * size * d;
    std::vector<float> rk(count), rv(count);
    cpu->dequantize(0, size, rk.data(), rv.data());
    DeviceBuffer<float> gk(count), gv(count);
    gpu.dequantize(0, size, gk.get(), gv.get(), nullptr);
    EXPECT_LE(relative_error(gk.download(), rk), 1e-5);
    EXPECT_LE(relative_error(gv.download(), rv), 1e-5);

    // Files and the host both ways.
    const std::string path = vqtest::unique_temp_path("outliers.vqc");
    gpu.save(path);
    const auto back = CudaCodecCache::load(path);
    std::remove(path.c_str());
    EXPECT_EQ(back->outlier_tokens(), gpu.outlier_tokens());
    expect_same_attention(*back, *cpu, hq, 1, true, ++seed, "loaded");
    const auto from_cpu = CudaCodecCache::from_host(*cpu);
    EXPECT_EQ(from_cpu->outlier_tokens(), cpu->outlier_tokens());
    expect_same_attention(*from_cpu, *cpu, hq, 3, true, ++seed, "from_host");

    // Truncate drops the entries past the size (and their mask bits: the positions appended
    // again are read from the pages unless flagged anew).
    gpu.truncate(size - 50);
    cpu->trim(50);
    EXPECT_EQ(gpu.outlier_tokens(), cpu->outlier_tokens());
    const auto again = vqtest::random_tokens(H, 60, d, ++seed, 0.15f);
    DeviceBuffer<float> da(again);
    cpu->append(again.data(), again.data(), 60);
    gpu.append(da.get(), da.get(), 60, nullptr);
    EXPECT_EQ(gpu.outlier_tokens(), cpu->outlier_tokens());
    expect_same_attention(gpu, *cpu, hq, 60, true, ++seed, "after truncate and append");

    // A failed append (a NaN key) changes nothing: not the entries, not the observer.
    const auto before = gpu.config().outlier_observer->stats(0, 0);
    auto bad = vqtest::random_tokens(H, 4, d, ++seed, 0.15f);
    bad[d + 1] = NAN;
    DeviceBuffer<float> db(bad);
    const int held = gpu.outlier_tokens();
    EXPECT_THROW(gpu.append(db.get(), db.get(), 4, nullptr), std::invalid_argument);
    EXPECT_EQ(gpu.outlier_tokens(), held);
    EXPECT_EQ(gpu.config().outlier_observer->stats(0, 0).count, before.count);

    gpu.reset();
    EXPECT_EQ(gpu.outlier_tokens(), 0);
}

// A sliding window over a cache with outliers: each eviction drops the entries of the evicted
// positions (as SlidingWindowKVCache's evict_range), and the attention stays the CPU window's.
TEST_P(CodecOutliers, SlidingWindowDropsEvictedEntries) {
    SKIP_WITHOUT_DEVICE();
    const OutlierCase& k = GetParam();
    const int H = k.heads, d = k.d, hq = H * 2, window = 100, sinks = 4;
    SlidingWindowKVCache cpu(cpu_cache(observed(k.config), H, d), window, sinks);
    CudaCodecCache gpu(observed(k.config), H, d, 4096, 0, window, sinks);
    uint64_t seed = 500;
    std::vector<int> chunks = {150, 90};
    chunks.insert(chunks.end(), 70, 1);
    chunks.push_back(60);
    int step = 0;
    for (const int n : chunks) {
        const std::string what = append_to_both(cpu, gpu, n, seed, step++);
        ASSERT_EQ(gpu.outlier_tokens(), cpu.inner().outlier_tokens()) << what;
        expect_same_attention(gpu, cpu, hq, n, true, ++seed, "causal, " + what);
    }
    const auto host = gpu.to_host();
    expect_same_entries(*host->outlier_store(), *cpu.inner().outlier_store(), "window to_host");
}

// A batch's decode steps (CudaCodecBatch: one append, one attention launch) over three caches
// sharing one observer, as a model's layer shares it, against three CPU caches sharing another,
// fed one by one in sequence order: the same entries in each sequence after every step, and
// each sequence's attention within 1e-3 of its CPU cache's. The third sequence's tokens have no
// planted outliers (its side store may stay empty: no view of it then). A NaN in one sequence
// changes nothing in any.
TEST_P(CodecOutliers, BatchStepsMatchEachCpuCache) {
    SKIP_WITHOUT_DEVICE();
    const OutlierCase& k = GetParam();
    const int H = k.heads, d = k.d, hq = H * 4, B = 3;
    const KVCacheConfig cpu_config = observed(k.config), gpu_config = observed(k.config);
    std::vector<std::unique_ptr<QuantizedKVCache>> cpu;
    std::vector<std::unique_ptr<CudaCodecCache>> gpu;
    std::vector<CudaCodecCache*> rows;
    uint64_t seed = 900;
    const auto tokens = [&](int b, int n) {
        return b == B - 1 ? vqtest::random_tokens(H, n, d, ++seed, 0.15f)
                          : tokens_with_outliers(H, n, d, ++seed);
    };
    for (int b = 0; b < B; ++b) {
        cpu.push_back(cpu_cache(cpu_config, H, d));
        gpu.push_back(std::make_unique<CudaCodecCache>(gpu_config, H, d, 4096));
        rows.push_back(gpu.back().get());
        const int n = 200 - 50 * b;
        const auto keys = tokens(b, n);
        const auto values = vqtest::random_tokens(H, n, d, ++seed, 0.5f);
        DeviceBuffer<float> dk(keys), dv(values);
        cpu[b]->append(keys.data(), values.data(), n);
        gpu[b]->append(dk.get(), dv.get(), n, nullptr);
    }
    ASSERT_TRUE(CudaCodecBatch::alike({rows.begin(), rows.end()}));
    CudaCodecBatch batch;
    const std::size_t token = static_cast<std::size_t>(H) * d,
                      query = static_cast<std::size_t>(hq) * d;
    for (int step = 0; step < 30; ++step) {
        std::vector<float> keys, values;
        for (int b = 0; b < B; ++b) {
            const auto k1 = tokens(b, 1), v1 = vqtest::random_tokens(H, 1, d, ++seed, 0.5f);
            cpu[b]->append(k1.data(), v1.data(), 1);
            keys.insert(keys.end(), k1.begin(), k1.end());
            values.insert(values.end(), v1.begin(), v1.end());
        }
        DeviceBuffer<float> dk(keys), dv(values);
        batch.append(rows, dk.get(), dv.get(), 1, nullptr);
        const auto q = vqtest::randn(B * query, ++seed, 1.0f);
        DeviceBuffer<float> dq(q), dout(q.size());
        batch.attend(rows, dq.get(), hq, dout.get(), 0.125f, nullptr);
        const auto out = dout.download();
        for (int b = 0; b < B; ++b) {
            const std::string what =
                "step " + std::to_string(step) + ", sequence " + std::to_string(b);
            ASSERT_EQ(gpu[b]->outlier_tokens(), cpu[b]->outlier_tokens()) << what;
            std::vector<float> ref(query);
            cpu[b]->attend(q.data() + b * query, hq, 1, ref.data(), 0.125f, true);
            const std::vector<float> mine(out.begin() + b * query, out.begin() + (b + 1) * query);
            EXPECT_LE(relative_error(mine, ref), 1e-3) << what;
        }
    }
    EXPECT_GE(gpu[0]->outlier_tokens(), 10) << "the test's tokens must have outliers";
    for (int b = 0; b < B; ++b)
        expect_same_entries(*gpu[b]->to_host()->outlier_store(), *cpu[b]->outlier_store(),
                            "sequence " + std::to_string(b));

    std::vector<float> bad = vqtest::random_tokens(B * H, 1, d, ++seed, 0.15f);
    bad[token + 3] = NAN;  // sequence 1's
    DeviceBuffer<float> db(bad);
    const auto stats = gpu_config.outlier_observer->stats(0, 0);
    std::vector<int> held;
    for (const auto& c : gpu) held.push_back(c->outlier_tokens());
    EXPECT_THROW(batch.append(rows, db.get(), db.get(), 1, nullptr), std::invalid_argument);
    EXPECT_EQ(gpu_config.outlier_observer->stats(0, 0).count, stats.count);
    for (int b = 0; b < B; ++b) {
        EXPECT_EQ(gpu[b]->outlier_tokens(), held[b]);
        EXPECT_EQ(gpu[b]->size(), cpu[b]->size());
    }
}

INSTANTIATE_TEST_SUITE_P(Methods, CodecOutliers, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace veloxquant::cuda
