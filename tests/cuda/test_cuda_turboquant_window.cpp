// Sliding windows in the tuned turboquant cache (CudaTurboQuantCache with window > 0) against the
// CPU's SlidingWindowKVCache around a TurboQuantRVQKVCache of the same config, window and sinks:
// the same pages held after every append, decode attention on the codes within 1e-3 relative
// error (sink pages and window spans that skip evicted pages, at groups of 4 and 8 query heads,
// on layouts that take the mixed-row kernels without a window), a batch of windows of different
// lengths in one launch (CudaTurboQuantBatch), the same refusals (dequantize of evicted tokens,
// a truncate that would expose them, centred keys), and device memory that stays flat while
// positions grow. Skips without a device.
#include <gtest/gtest.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cache/paged_store.h"
#include "cuda/cuda_cache.h"
#include "cuda/turboquant_batch.h"
#include "cuda_test_helpers.h"
#include "veloxquant/caches.h"
#include "window_test_helpers.h"

namespace veloxquant::cuda {
namespace {

using vqtest::DeviceBuffer;
using vqtest::expect_same_pages_held;
using vqtest::random_tokens;
using vqtest::relative_error;

struct TqWindowCase {
    std::string name;
    int d, bits, stages, value_bits, heads, group, window, sinks;
};

KVCacheConfig config_of(const TqWindowCase& k) {
    KVCacheConfig c = vqtest::method_config("turboquant_rvq", k.bits, k.value_bits, 77);
    c.num_residuals = k.stages;
    return c;
}

std::vector<TqWindowCase> cases() {
    return {
        // The benchmarked mixed-row layouts (1-bit / 2-bit, 4-bit / 4-bit, two 2-bit stages /
        // 4-bit),
        // which a window sends to the general kernels.
        {"k1v2_d128_w100_s4", 128, 1, 1, 2, 2, 4, 100, 4},
        {"k4v4_d128_w200_s0", 128, 4, 1, 4, 2, 4, 200, 0},
        {"k2x2v4_d64_w64_s70", 64, 2, 2, 4, 2, 4, 64, 70},  // sinks past a page
        {"k3v1_d128_w130_s4_g8", 128, 3, 1, 1, 1, 8, 130, 4},
        {"k1v2_d64_w1000_s4_g8", 64, 1, 1, 2, 2, 8, 1000, 4},
        {"k2v16_d64_w90_s2", 64, 2, 1, 16, 3, 2, 90, 2},
    };
}

class TurboQuantWindow : public ::testing::TestWithParam<TqWindowCase> {};

std::unique_ptr<SlidingWindowKVCache> cpu_window(const TqWindowCase& k, int max_len) {
    return std::make_unique<SlidingWindowKVCache>(
        std::make_unique<TurboQuantRVQKVCache>(config_of(k), k.heads, k.d, max_len), k.window,
        k.sinks);
}

// One decode query per query head on both caches.
void expect_same_decode(const CudaTurboQuantCache& gpu, const SlidingWindowKVCache& cpu, int hq,
                        uint64_t seed, const std::string& what) {
    const auto q = vqtest::randn(static_cast<std::size_t>(hq) * gpu.head_dim(), seed, 1.0f);
    std::vector<float> ref(q.size());
    cpu.attend(q.data(), hq, 1, ref.data(), 0.125f, true);
    DeviceBuffer<float> dq(q), dout(q.size());
    gpu.attend(dq.get(), hq, dout.get(), 0.125f, nullptr);
    EXPECT_LE(relative_error(dout.download(), ref), 1e-3) << what;
}

TEST_P(TurboQuantWindow, DecodesAsTheCpuWindowAndHoldsTheSamePages) {
    SKIP_WITHOUT_DEVICE();
    const TqWindowCase& k = GetParam();
    const int H = k.heads, d = k.d, hq = H * k.group;
    auto cpu = cpu_window(k, 4096);
    CudaTurboQuantCache gpu(config_of(k), H, d, 4096, 0, k.window, k.sinks);
    EXPECT_EQ(gpu.window(), k.window);
    EXPECT_EQ(gpu.sink_tokens(), k.sinks);
    uint64_t seed = 40;
    // Chunks (whose first token's window keeps pages the decode after skips), decode steps across
    // page boundaries, and a long chunk that moves the window past many pages at once.
    std::vector<int> chunks = {300, 130, 5};
    chunks.insert(chunks.end(), 66, 1);
    chunks.push_back(1200);
    chunks.insert(chunks.end(), 3, 1);
    int step = 0;
    for (const int n : chunks) {
        const auto keys = random_tokens(H, n, d, ++seed, 0.5f);
        const auto values = random_tokens(H, n, d, ++seed, 0.5f);
        DeviceBuffer<float> dk(keys), dv(values);
        cpu->append(keys.data(), values.data(), n);
        gpu.append(dk.get(), dv.get(), n, nullptr);
        expect_same_pages_held(gpu, *cpu);
        expect_same_decode(
            gpu, *cpu, hq, ++seed,
            "step " + std::to_string(step++) + ", " + std::to_string(gpu.size()) + " tokens");
    }

    // Dequantize: the window's tokens as the CPU's; evicted ones refused.
    const int size = gpu.size();
    const int evicted = vqtest::expect_window_dequantize(gpu, *cpu);

    // Truncation: into evicted tokens it throws and changes nothing; by one token it does as
    // the CPU's trim does (refused where the new last token's window starts on an evicted page:
    // a decode step evicts up to its own window).
    const int exposing = evicted + k.window + 1;
    EXPECT_THROW(cpu->trim(size - exposing), std::invalid_argument);
    EXPECT_THROW(gpu.truncate(exposing), std::invalid_argument);
    EXPECT_EQ(gpu.size(), size);
    bool cpu_trimmed = true;
    try {
        cpu->trim(1);
    } catch (const std::invalid_argument&) {
        cpu_trimmed = false;
    }
    if (cpu_trimmed) {
        gpu.truncate(size - 1);
        expect_same_pages_held(gpu, *cpu);
        expect_same_decode(gpu, *cpu, hq, ++seed, "after truncate");
    } else {
        EXPECT_THROW(gpu.truncate(size - 1), std::invalid_argument);
        EXPECT_EQ(gpu.size(), size);
    }

    gpu.reset();
    EXPECT_EQ(gpu.size(), 0);
    const auto one = random_tokens(H, 1, d, ++seed, 0.5f);
    DeviceBuffer<float> d1(one);
    gpu.append(d1.get(), d1.get(), 1, nullptr);
    EXPECT_TRUE(gpu.position_held(0));
}

// Sequences of different lengths, each past its window, take their decode steps together: one
// append and one decode launch for all, each through its own page table, as each cache alone
// and as the CPU's windows.
TEST_P(TurboQuantWindow, BatchDecodesEachWindowThroughItsOwnPages) {
    SKIP_WITHOUT_DEVICE();
    const TqWindowCase& k = GetParam();
    const int H = k.heads, d = k.d, hq = H * k.group, B = 3;
    std::vector<std::unique_ptr<SlidingWindowKVCache>> cpus;
    std::vector<std::unique_ptr<CudaTurboQuantCache>> gpus;
    uint64_t seed = 900;
    for (int b = 0; b < B; ++b) {
        cpus.push_back(cpu_window(k, 4096));
        gpus.push_back(
            std::make_unique<CudaTurboQuantCache>(config_of(k), H, d, 4096, 0, k.window, k.sinks));
        const int n = 150 + 370 * b;  // 150, 520, 890 tokens
        const auto keys = random_tokens(H, n, d, ++seed, 0.5f);
        const auto values = random_tokens(H, n, d, ++seed, 0.5f);
        DeviceBuffer<float> dk(keys), dv(values);
        cpus[b]->append(keys.data(), values.data(), n);
        gpus[b]->append(dk.get(), dv.get(), n, nullptr);
    }
    std::vector<CudaTurboQuantCache*> caches;
    std::vector<const CudaTurboQuantCache*> readers;
    for (auto& g : gpus) caches.push_back(g.get()), readers.push_back(g.get());
    CudaTurboQuantBatch batch;
    const std::size_t per_sequence = static_cast<std::size_t>(H) * d;
    for (int step = 0; step < 70; ++step) {  // across a page boundary of every sequence
        const auto keys = random_tokens(B * H, 1, d, ++seed, 0.5f);
        const auto values = random_tokens(B * H, 1, d, ++seed, 0.5f);
        DeviceBuffer<float> dk(keys), dv(values);
        batch.append(caches, dk.get(), dv.get(), 1, nullptr);
        for (int b = 0; b < B; ++b) {
            cpus[b]->append(keys.data() + b * per_sequence, values.data() + b * per_sequence, 1);
            expect_same_pages_held(*gpus[b], *cpus[b]);
        }
        if (step % 23 != 0) continue;
        const auto q = vqtest::randn(static_cast<std::size_t>(B) * hq * d, ++seed, 1.0f);
        DeviceBuffer<float> dq(q), dout(q.size());
        batch.attend(readers, dq.get(), hq, dout.get(), 0.125f, nullptr);
        const auto out = dout.download();
        for (int b = 0; b < B; ++b) {
            const std::size_t rows = static_cast<std::size_t>(hq) * d;
            const std::vector<float> qb(q.begin() + b * rows, q.begin() + (b + 1) * rows);
            std::vector<float> ref(rows);
            cpus[b]->attend(qb.data(), hq, 1, ref.data(), 0.125f, true);
            const std::vector<float> got(out.begin() + b * rows, out.begin() + (b + 1) * rows);
            EXPECT_LE(relative_error(got, ref), 1e-3)
                << "sequence " << b << ", step " << step << ", " << gpus[b]->size() << " tokens";
        }
    }
    // A window batches only with windows of its width and sinks.
    CudaTurboQuantCache wider(config_of(k), H, d, 4096, 0, k.window + 1, k.sinks);
    const auto one = random_tokens(H, 1, d, ++seed, 0.5f);
    DeviceBuffer<float> d1(one);
    wider.append(d1.get(), d1.get(), 1, nullptr);
    const std::size_t two = static_cast<std::size_t>(2) * hq * d;
    DeviceBuffer<float> dq(two), dout(two);
    EXPECT_THROW(batch.attend({readers[0], &wider}, dq.get(), hq, dout.get(), 0.125f, nullptr),
                 std::invalid_argument);
}

INSTANTIATE_TEST_SUITE_P(Cases, TurboQuantWindow, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

// The pool follows the window: a window's device bytes stay flat while its positions grow far
// past it.
TEST(TurboQuantWindowMemory, StaysFlatWhilePositionsGrow) {
    SKIP_WITHOUT_DEVICE();
    KVCacheConfig c = vqtest::method_config("turboquant_rvq", 1, 2, 3);
    CudaTurboQuantCache gpu(c, 2, 128, 1 << 16, 0, 256, 4);
    const auto chunk = random_tokens(2, 200, 128, 5, 0.5f);
    DeviceBuffer<float> dk(chunk);
    std::size_t after_first = 0;
    for (int i = 0; i < 100; ++i) {
        gpu.append(dk.get(), dk.get(), 200, nullptr);
        if (i == 20) after_first = gpu.nbytes();  // (held pages cycle every 16 appends)
    }
    EXPECT_EQ(gpu.size(), 20000);
    EXPECT_EQ(gpu.nbytes(), after_first);
}

TEST(TurboQuantWindowScope, RefusesBadWindowsAndCentredKeys) {
    SKIP_WITHOUT_DEVICE();
    KVCacheConfig c = vqtest::method_config("turboquant_rvq", 2, 4, 3);
    EXPECT_THROW(CudaTurboQuantCache(c, 2, 128, 1024, 0, -1, 4), std::invalid_argument);
    EXPECT_THROW(CudaTurboQuantCache(c, 2, 128, 1024, 0, 100, -1), std::invalid_argument);
    c.center_keys = true;
    EXPECT_THROW(CudaTurboQuantCache(c, 2, 128, 1024, 0, 100, 4), std::invalid_argument);
    EXPECT_NO_THROW(CudaTurboQuantCache(c, 2, 128, 1024, 0, 0, 4));  // no window: centred is fine
}

}  // namespace
}  // namespace veloxquant::cuda
