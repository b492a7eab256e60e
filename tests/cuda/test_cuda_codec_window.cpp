// Sliding windows on the device (CudaCodecCache with window > 0) against the CPU's
// SlidingWindowKVCache of the same config, window and sinks: the same pages held after every
// append, decode and causal-prefill attention on the codes within 1e-3 relative error (the wide
// prefill kernel and the generic one at 4 and 8 rows a CTA, sink pages and window spans that skip
// evicted pages),
// the same refusals (a causal chunk reaching evicted tokens, dequantize of evicted tokens, a
// truncate that would expose them), device memory that stays flat while positions grow, and the
// window through a saved file and the host both ways. Skips without a device.
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cache/paged_store.h"
#include "cuda/codec_batch.h"
#include "cuda/codec_cache.h"
#include "cuda_test_helpers.h"
#include "veloxquant/caches.h"
#include "veloxquant/factory.h"
#include "window_test_helpers.h"

namespace veloxquant::cuda {
namespace {

using vqtest::DeviceBuffer;
using vqtest::expect_same_pages_held;
using vqtest::method_config;
using vqtest::random_tokens;
using vqtest::relative_error;

struct WindowCase {
    std::string name;
    KVCacheConfig config;
    int heads, d, window, sinks;
};

std::vector<WindowCase> cases() {
    KVCacheConfig tq = method_config("turboquant_rvq", 2, 4, 1);
    KVCacheConfig centred = method_config("turboquant_rvq", 3, 2, 2);
    centred.center_keys = true;
    return {
        {"tq_w100_s4", tq, 2, 128, 100, 4},
        {"tq_w200_s0", tq, 2, 128, 200, 0},
        {"tq_w64_s70", tq, 2, 64, 64, 70},  // sinks past a page
        {"fp16_w130_s4", method_config("fp16", 4, 16, 3), 2, 64, 130, 4},
        {"rabitq_w150_s4", method_config("rabitq", 3, 4, 4), 2, 64, 150, 4},
        {"polarquant_w90_s2", method_config("polarquant", 3, 4, 5), 1, 128, 90, 2},
        {"qjl_w120_s4", method_config("qjl", 1, 4, 6), 2, 128, 120, 4},
        {"centred_w100_s4", centred, 2, 128, 100, 4},
    };
}

class CodecWindow : public ::testing::TestWithParam<WindowCase> {};

std::unique_ptr<SlidingWindowKVCache> cpu_window(const WindowCase& k, int max_len) {
    auto made = KVCacheFactory::create(k.config, k.heads, k.d, max_len);
    std::unique_ptr<QuantizedKVCache> inner(static_cast<QuantizedKVCache*>(made.release()));
    return std::make_unique<SlidingWindowKVCache>(std::move(inner), k.window, k.sinks);
}

// Attention of n queries per query head (causal or not) on both caches; the device refuses
// exactly where the CPU does.
void expect_same_attention(CudaCodecCache& gpu, const SlidingWindowKVCache& cpu, int hq, int n,
                           bool causal, uint64_t seed, const std::string& what) {
    const int d = gpu.head_dim();
    const auto q = vqtest::randn(static_cast<std::size_t>(hq) * n * d, seed, 1.0f);
    std::vector<float> ref(q.size());
    DeviceBuffer<float> dq(q), dout(q.size());
    bool cpu_refused = false;
    try {
        cpu.attend(q.data(), hq, n, ref.data(), 0.125f, causal);
    } catch (const std::invalid_argument&) {
        cpu_refused = true;
    }
    if (cpu_refused) {
        EXPECT_THROW(gpu.attend(dq.get(), hq, n, dout.get(), 0.125f, causal, nullptr),
                     std::invalid_argument)
            << what;
        return;
    }
    gpu.attend(dq.get(), hq, n, dout.get(), 0.125f, causal, nullptr);
    EXPECT_LE(relative_error(dout.download(), ref), 1e-3) << what;
}

TEST_P(CodecWindow, AttendsAsTheCpuWindowAndHoldsTheSamePages) {
    SKIP_WITHOUT_DEVICE();
    const WindowCase& k = GetParam();
    const int H = k.heads, d = k.d, hq = H * 4;
    auto cpu = cpu_window(k, 4096);
    CudaCodecCache gpu(k.config, H, d, 4096, 0, k.window, k.sinks);
    EXPECT_EQ(gpu.window(), k.window);
    EXPECT_EQ(gpu.sink_tokens(), k.sinks);
    uint64_t seed = 40;
    // A long prefill chunk (4 x 300 rows: the wide kernel where the codec has the feature form,
    // each CTA of 128 rows walking from its own first row's window; the generic kernel at 8 rows
    // a CTA otherwise), a second chunk, a short one (8 rows a CTA), decode steps across page
    // boundaries (4 rows a CTA), then a chunk whose first queries' windows reach evicted pages.
    std::vector<int> chunks = {300, 130, 5};
    chunks.insert(chunks.end(), 66, 1);
    chunks.push_back(90);
    int step = 0;
    for (const int n : chunks) {
        const auto keys = random_tokens(H, n, d, ++seed, 0.5f);
        const auto values = random_tokens(H, n, d, ++seed, 0.5f);
        DeviceBuffer<float> dk(keys), dv(values);
        cpu->append(keys.data(), values.data(), n);
        gpu.append(dk.get(), dv.get(), n, nullptr);
        expect_same_pages_held(gpu, *cpu);
        const std::string what =
            "step " + std::to_string(step++) + ", " + std::to_string(gpu.size()) + " tokens";
        expect_same_attention(gpu, *cpu, hq, n, true, ++seed, "causal, " + what);
    }
    // A chunk of more queries than the last append: refused where the CPU refuses.
    expect_same_attention(gpu, *cpu, hq, 150, true, ++seed, "150 causal queries");
    expect_same_attention(gpu, *cpu, hq, 2, false, ++seed, "non-causal");

    // Dequantize: the window's tokens as the CPU's; evicted ones refused.
    const int size = gpu.size();
    const int evicted = vqtest::expect_window_dequantize(gpu, *cpu);

    // Through the host: the CPU cache is the same window over the same pages; a saved file
    // loads back onto the device with its window.
    const auto host = gpu.host_cache();
    ASSERT_EQ(host->class_name(), "SlidingWindowKVCache");
    const auto q = vqtest::randn(static_cast<std::size_t>(hq) * d, ++seed, 1.0f);
    std::vector<float> ref(q.size()), via_host(q.size());
    cpu->attend(q.data(), hq, 1, ref.data(), 0.125f, true);
    host->attend(q.data(), hq, 1, via_host.data(), 0.125f, true);
    EXPECT_LE(relative_error(via_host, ref), 1e-3) << "host_cache";
    DeviceBuffer<float> dq(q), dout(q.size()), dback(q.size());
    gpu.attend(dq.get(), hq, 1, dout.get(), 0.125f, true, nullptr);
    const std::string path = vqtest::unique_temp_path("window.vqc");
    gpu.save(path);
    const auto loaded = KVCache::load(path);
    EXPECT_EQ(loaded->class_name(), "SlidingWindowKVCache");
    const auto back = CudaCodecCache::load(path);
    std::remove(path.c_str());
    ASSERT_EQ(back->size(), size);
    EXPECT_EQ(back->window(), k.window);
    EXPECT_EQ(back->sink_tokens(), k.sinks);
    back->attend(dq.get(), hq, 1, dback.get(), 0.125f, true, nullptr);
    EXPECT_LE(relative_error(dback.download(), dout.download()), 1e-6) << "save / load";
    const auto from_cpu = CudaCodecCache::from_host(*cpu);
    expect_same_pages_held(*from_cpu, *cpu);
    expect_same_attention(*from_cpu, *cpu, hq, 1, true, ++seed, "from_host");

    // Truncation: back into the window works as the CPU's trim; into evicted tokens it throws
    // and changes nothing.
    const int exposing = evicted + k.window + 1;  // its last token's window starts at `evicted`
    EXPECT_THROW(cpu->trim(size - exposing), std::invalid_argument);
    EXPECT_THROW(gpu.truncate(exposing), std::invalid_argument);
    EXPECT_EQ(gpu.size(), size);
    gpu.truncate(size - 10);
    cpu->trim(10);
    expect_same_pages_held(gpu, *cpu);
    expect_same_attention(gpu, *cpu, hq, 1, true, ++seed, "after truncate");

    // A window batches only with windows of its width and sinks.
    EXPECT_TRUE(CudaCodecBatch::alike({&gpu}));
    CudaCodecCache wider(k.config, H, d, 4096, 0, k.window + 1, k.sinks),
        plain(k.config, H, d, 4096);
    const auto one = random_tokens(H, 1, d, ++seed, 0.5f);
    DeviceBuffer<float> d1(one);
    wider.append(d1.get(), d1.get(), 1, nullptr);
    plain.append(d1.get(), d1.get(), 1, nullptr);
    EXPECT_FALSE(CudaCodecBatch::alike({&gpu, &wider}));
    EXPECT_FALSE(CudaCodecBatch::alike({&gpu, &plain}));

    gpu.reset();
    EXPECT_EQ(gpu.size(), 0);
    gpu.append(d1.get(), d1.get(), 1, nullptr);
    EXPECT_TRUE(gpu.position_held(0));
}

// A prompt of many windows appended as one chunk and attended causally at once, as a sliding
// layer's prefill: each CTA walks only its own rows' windows (the span from its first row's
// window on, at most TokenWindow::span_bound tokens), in groups of 1, 3 and 8 query heads per KV
// head (different rows a CTA and queries a row block), and a non-causal chunk over it.
TEST_P(CodecWindow, LongPromptAttendsWithinEachQuerysWindow) {
    SKIP_WITHOUT_DEVICE();
    const WindowCase& k = GetParam();
    const int H = k.heads, d = k.d, n = 1500;
    auto cpu = cpu_window(k, 4096);
    CudaCodecCache gpu(k.config, H, d, 4096, 0, k.window, k.sinks);
    const auto keys = random_tokens(H, n, d, 700, 0.5f);
    const auto values = random_tokens(H, n, d, 701, 0.5f);
    DeviceBuffer<float> dk(keys), dv(values);
    cpu->append(keys.data(), values.data(), n);
    gpu.append(dk.get(), dv.get(), n, nullptr);
    uint64_t seed = 710;
    for (const int group : {1, 3, 8})
        expect_same_attention(gpu, *cpu, H * group, n, true, ++seed,
                              "causal prompt, group " + std::to_string(group));
    expect_same_attention(gpu, *cpu, H * 4, 200, false, ++seed, "non-causal");
}

// Positions grow to 60 pages while the device memory stays what the first chunks took: the
// pages the window evicts are handed out again.
TEST_P(CodecWindow, MemoryStaysFlatAsPositionsGrow) {
    SKIP_WITHOUT_DEVICE();
    const WindowCase& k = GetParam();
    const int H = k.heads, d = k.d, chunk = 100;
    auto cpu = cpu_window(k, 4096);
    CudaCodecCache gpu(k.config, H, d, 4096, 0, k.window, k.sinks);
    std::size_t settled = 0;
    uint64_t seed = 90;
    for (int i = 0; i < 38; ++i) {
        const auto keys = random_tokens(H, chunk, d, ++seed, 0.5f);
        DeviceBuffer<float> dk(keys);
        cpu->append(keys.data(), keys.data(), chunk);
        gpu.append(dk.get(), dk.get(), chunk, nullptr);
        if (i == 4) settled = gpu.nbytes();
    }
    // Centred keys keep each position page's RoPE phases (512 bytes a page at d = 128).
    if (k.config.center_keys)
        EXPECT_LE(gpu.nbytes(), settled + 64 * 1024);
    else
        EXPECT_EQ(gpu.nbytes(), settled);
    expect_same_pages_held(gpu, *cpu);
    expect_same_attention(gpu, *cpu, H * 2, 1, true, ++seed, "after 3800 tokens");
    expect_same_attention(gpu, *cpu, H * 2, chunk, true, ++seed, "last chunk");
}

// Decode steps of three windows of different lengths in one batch (CudaCodecBatch: each
// sequence's appends through its own pool, one attention launch reading each sequence's page
// table) follow each sequence's CPU window: the same pages held, attention within 1e-3.
TEST_P(CodecWindow, BatchStepsFollowEachWindow) {
    SKIP_WITHOUT_DEVICE();
    const WindowCase& k = GetParam();
    const int H = k.heads, d = k.d, hq = H * 4, B = 3;
    std::vector<std::unique_ptr<SlidingWindowKVCache>> cpu;
    std::vector<std::unique_ptr<CudaCodecCache>> gpu;
    std::vector<CudaCodecCache*> caches;
    uint64_t seed = 300;
    for (const int n : {250, 333, 520}) {
        cpu.push_back(cpu_window(k, 4096));
        gpu.push_back(std::make_unique<CudaCodecCache>(k.config, H, d, 4096, 0, k.window, k.sinks));
        caches.push_back(gpu.back().get());
        const auto keys = random_tokens(H, n, d, ++seed, 0.5f);
        const auto values = random_tokens(H, n, d, ++seed, 0.5f);
        DeviceBuffer<float> dk(keys), dv(values);
        cpu.back()->append(keys.data(), values.data(), n);
        gpu.back()->append(dk.get(), dv.get(), n, nullptr);
    }
    ASSERT_TRUE(CudaCodecBatch::alike({caches.begin(), caches.end()}));
    CudaCodecBatch batch;
    const std::size_t per_token = static_cast<std::size_t>(H) * d,
                      per_query = static_cast<std::size_t>(hq) * d;
    for (int step = 0; step < 70; ++step) {
        const auto keys = random_tokens(B * H, 1, d, ++seed, 0.5f);
        const auto values = random_tokens(B * H, 1, d, ++seed, 0.5f);
        const auto q = vqtest::randn(B * per_query, ++seed, 1.0f);
        DeviceBuffer<float> dk(keys), dv(values), dq(q), dout(q.size());
        batch.append(caches, dk.get(), dv.get(), 1, nullptr);
        batch.attend(caches, dq.get(), hq, dout.get(), 0.125f, nullptr);
        const auto got = dout.download();
        for (int b = 0; b < B; ++b) {
            cpu[b]->append(keys.data() + b * per_token, values.data() + b * per_token, 1);
            expect_same_pages_held(*gpu[b], *cpu[b]);
            std::vector<float> ref(per_query);
            cpu[b]->attend(q.data() + b * per_query, hq, 1, ref.data(), 0.125f, true);
            const std::vector<float> mine(got.begin() + b * per_query,
                                          got.begin() + (b + 1) * per_query);
            EXPECT_LE(relative_error(mine, ref), 1e-3) << "step " << step << ", sequence " << b;
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Windows, CodecWindow, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

TEST(CodecWindowErrors, RefusesImpossibleWindows) {
    SKIP_WITHOUT_DEVICE();
    const KVCacheConfig c = method_config("turboquant_rvq", 2, 4, 1);
    EXPECT_THROW(CudaCodecCache(c, 2, 64, 1024, 0, -1, 4), std::invalid_argument);
    EXPECT_THROW(CudaCodecCache(c, 2, 64, 1024, 0, 100, -1), std::invalid_argument);
    CudaCodecCache plain(c, 2, 64, 1024);
    EXPECT_EQ(plain.window(), 0);
    EXPECT_EQ(plain.sink_tokens(), 0);
}

}  // namespace
}  // namespace veloxquant::cuda
