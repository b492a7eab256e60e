// Centred keys (center_keys) in the generic device cache (CudaCodecCache) against the CPU cache of
// the same config, on keys with a strong pre-RoPE mean, for the methods that take centring
// (polarquant, qjl, ratequant, rabitq, which trains on the centred keys, and fp16) on both RoPE
// pairings, full and partial RoPE: the mean the device estimates, decode and causal-prefill
// attention (relative error 1e-3) and dequantize; a CPU cache's pages and mean moved to the device
// and a device cache's to the host and through a file; a batch of kin sequences with their own
// means (one too short to centre); the gain over uncentred keys; and a refused first append
// that leaves the cache untrained (test_cuda_input_errors: the heads too wide for the centre).
// Every device test skips cleanly when no CUDA device is present.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "centred_test_helpers.h"
#include "cuda/codec_batch.h"
#include "cuda/codec_cache.h"
#include "cuda/cuda_cache.h"
#include "cuda_test_helpers.h"
#include "rope_test_keys.h"
#include "test_helpers.h"
#include "veloxquant/caches.h"
#include "veloxquant/factory.h"

namespace veloxquant::cuda {
namespace {

using vqtest::DeviceBuffer;
using vqtest::relative_error;

struct Case {
    std::string method;
    int bits, value_bits, d, heads, pairs;  // pairs: RoPE frequencies (partial: < d / 2)
    bool half_split;
};

const Case kCases[] = {
    {"polarquant", 3, 4, 128, 2, 64, true},  // transformers' pairing
    {"rabitq", 4, 4, 128, 2, 32, false},     // trains on centred keys; partial RoPE, GGUF pairing
    {"qjl", 1, 2, 64, 3, 32, true},          // sketch_dim 2 d
    {"ratequant", 2, 4, 64, 2, 16, true},    // partial RoPE, half split
    {"fp16", 4, 16, 96, 2, 48, false},       // a head width of the generic kernels alone
};

std::string name(const Case& c) {
    return c.method + " d" + std::to_string(c.d) + " k" + std::to_string(c.bits) + " v" +
           std::to_string(c.value_bits) + " P" + std::to_string(c.pairs) +
           (c.half_split ? " half" : " adjacent");
}

std::vector<double> freqs_of(const Case& c) {
    return vqtest::rope_freqs(2 * c.pairs);
}

KVCacheConfig config_of(const Case& c, uint64_t seed, bool centred = true) {
    KVCacheConfig k = vqtest::method_config(c.method, c.bits, c.value_bits, seed);
    if (c.method == "qjl") k.sketch_dim = 2 * c.d;
    k.center_keys = centred;
    k.rope_inv_freq = freqs_of(c);
    k.rope_half_split = c.half_split;
    return k;
}

std::unique_ptr<QuantizedKVCache> cpu_cache(const KVCacheConfig& c, int heads, int d) {
    std::unique_ptr<KVCache> made = KVCacheFactory::create(c, heads, d, 4096, 0);
    auto* q = dynamic_cast<QuantizedKVCache*>(made.get());
    if (q == nullptr) throw std::logic_error("the factory made no QuantizedKVCache");
    made.release();
    return std::unique_ptr<QuantizedKVCache>(q);
}

// Attention of the last n_queries tokens (causal) or of one query per head over a device cache.
std::vector<float> device_attend(CudaCodecCache& gpu, const std::vector<float>& q, int hq,
                                 int n_queries, bool causal) {
    DeviceBuffer<float> dq(q), dout(q.size());
    gpu.attend(dq.get(), hq, n_queries, dout.get(), 0.1f, causal, nullptr);
    return dout.download();
}

TEST(CudaCodecCenterKeys, DeviceCacheMatchesTheCentredCpuCache) {
    SKIP_WITHOUT_DEVICE();
    uint64_t seed = 9700;
    for (const Case& s : kCases) {
        SCOPED_TRACE(name(s));
        const KVCacheConfig c = config_of(s, ++seed);
        const int total = 700, hq = 4 * s.heads;
        const auto keys =
            vqtest::rope_keys(s.heads, total, s.d, freqs_of(s), ++seed, 3.0, s.half_split);
        const auto values = vqtest::random_tokens(s.heads, total, s.d, ++seed, 0.5f);
        auto cpu = cpu_cache(c, s.heads, s.d);
        CudaCodecCache gpu(c, s.heads, s.d, 4096);
        int at = 0;
        for (int n : {500, 63, 1, 136}) {
            const auto k = vqtest::token_slice(keys, s.heads, total, s.d, at, at + n),
                       v = vqtest::token_slice(values, s.heads, total, s.d, at, at + n);
            DeviceBuffer<float> dk(k), dv(v);
            cpu->append(k.data(), v.data(), n);
            gpu.append(dk.get(), dv.get(), n, nullptr);
            at += n;
            if (n == 500) {
                ASSERT_TRUE(gpu.key_center().centering());
                EXPECT_LE(relative_error(gpu.key_center().mean(), vqtest::cpu_key_mean(*cpu)),
                          1e-5);
                // The CPU codecs hold the device's estimate (what to_host and save write).
                EXPECT_EQ(vqtest::cpu_key_mean(*gpu.to_host()), gpu.key_center().mean());
            }
            // A decode step, the causal chunk of the last 8 tokens (8 rows per CTA) and of the
            // last 40 (160 rows: the wide prefill kernel).
            for (int m : {1, 8, 40}) {
                const auto q = vqtest::randn(static_cast<std::size_t>(hq) * m * s.d, ++seed, 0.1f);
                std::vector<float> ref(q.size());
                cpu->attend(q.data(), hq, m, ref.data(), 0.1f, m > 1);
                EXPECT_LE(relative_error(device_attend(gpu, q, hq, m, m > 1), ref), 1e-3)
                    << m << " queries after " << at << " tokens";
            }
        }
        // Dequantize: the centres differ from the CPU's in rounding only, so a code may flip at
        // a tie now and then; every other token matches.
        const std::size_t count = static_cast<std::size_t>(s.heads) * at * s.d;
        std::vector<float> rk(count), rv(count);
        cpu->dequantize(0, at, rk.data(), rv.data());
        DeviceBuffer<float> dk(count), dv(count);
        gpu.dequantize(0, at, dk.get(), dv.get(), nullptr);
        const auto gk = dk.download();
        const int bad = vqtest::rows_differing(gk, rk, s.d);
        EXPECT_LE(bad, static_cast<int>(count / s.d / 100)) << bad << " tokens differ";
        EXPECT_LE(relative_error(gk, rk), 1e-3);
        EXPECT_LE(relative_error(dv.download(), rv), 1e-5);
    }
}

TEST(CudaCodecCenterKeys, PagesAndMeanTravelBetweenHostAndDevice) {
    SKIP_WITHOUT_DEVICE();
    uint64_t seed = 9800;
    for (const Case& s : {kCases[0], kCases[1]}) {
        SCOPED_TRACE(name(s));
        const KVCacheConfig c = config_of(s, ++seed);
        const int n = 900, hq = 2 * s.heads;
        const auto k = vqtest::rope_keys(s.heads, n, s.d, freqs_of(s), ++seed, 3.0, s.half_split);
        const auto v = vqtest::random_tokens(s.heads, n, s.d, ++seed, 0.5f);
        const auto q = vqtest::randn(static_cast<std::size_t>(hq) * s.d, ++seed, 0.1f);
        // A CPU cache's pages and mean on the device: its very codes, so its attention.
        auto cpu = cpu_cache(c, s.heads, s.d);
        cpu->append(k.data(), v.data(), n);
        std::vector<float> ref(q.size());
        cpu->attend(q.data(), hq, 1, ref.data(), 0.1f, true);
        auto up = CudaCodecCache::from_host(*cpu);
        EXPECT_EQ(up->key_center().mean(), vqtest::cpu_key_mean(*cpu));
        EXPECT_LE(relative_error(device_attend(*up, q, hq, 1, false), ref), 1e-3);
        // A device cache's pages and mean to the host, and through a file back to the device.
        CudaCodecCache gpu(c, s.heads, s.d, 4096);
        DeviceBuffer<float> dk(k), dv(v);
        gpu.append(dk.get(), dv.get(), n, nullptr);
        const auto mine = device_attend(gpu, q, hq, 1, false);
        auto host = gpu.to_host();
        std::vector<float> back(q.size());
        host->attend(q.data(), hq, 1, back.data(), 0.1f, true);
        EXPECT_LE(relative_error(mine, back), 1e-3);
        const std::string path = ::testing::TempDir() + "vq_codec_centred.vqkv";
        gpu.save(path);
        auto loaded = CudaCodecCache::load(path);
        std::remove(path.c_str());
        EXPECT_EQ(loaded->key_center().mean(), gpu.key_center().mean());
        EXPECT_LE(relative_error(device_attend(*loaded, q, hq, 1, false), mine), 1e-6);
    }
}

TEST(CudaCodecCenterKeys, BatchOfKinSequencesWithTheirOwnMeans) {
    SKIP_WITHOUT_DEVICE();
    for (const Case& s : {kCases[0], kCases[1]}) {  // shared codecs; kin (own centroids)
        SCOPED_TRACE(name(s));
        const KVCacheConfig c = config_of(s, 9900);
        CudaCodecBatch step;
        vqtest::check_centred_batch_steps(
            step, [&] { return cpu_cache(c, s.heads, s.d); },
            [&] { return std::make_unique<CudaCodecCache>(c, s.heads, s.d, 4096); }, s.heads, s.d,
            4 * s.heads, freqs_of(s), s.half_split, 9900);
    }
}

TEST(CudaCodecCenterKeys, CentringCutsTheAttentionErrorOnTheDevice) {
    SKIP_WITHOUT_DEVICE();
    const Case s = kCases[0];
    vqtest::check_centring_cuts_error(
        config_of(s, 9963),
        [&](const KVCacheConfig& c) {
            return std::make_unique<CudaCodecCache>(c, s.heads, s.d, 4096);
        },
        [](CudaCodecCache& gpu, const float* q, int hq, float* out) {
            gpu.attend(q, hq, 1, out, 0.125f, false, nullptr);
        },
        s.heads, s.d, 9960);
}

TEST(CudaCodecCenterKeys, RefusedFirstAppendLeavesTheCacheUntrained) {
    SKIP_WITHOUT_DEVICE();
    const Case s = kCases[1];  // rabitq: the mean and the centroids both come from this append
    const KVCacheConfig c = config_of(s, 9970);
    const int n = 300;
    auto k = vqtest::rope_keys(s.heads, n, s.d, freqs_of(s), 9971, 3.0, s.half_split);
    const auto v = vqtest::random_tokens(s.heads, n, s.d, 9972, 0.5f);
    CudaCodecCache gpu(c, s.heads, s.d, 4096);
    std::vector<float> bad = k;
    bad[5 * s.d + 3] = std::nanf("");
    DeviceBuffer<float> dbad(bad), dv(v);
    EXPECT_THROW(gpu.append(dbad.get(), dv.get(), n, nullptr), std::invalid_argument);
    EXPECT_EQ(gpu.size(), 0);
    EXPECT_FALSE(gpu.key_center().estimated());
    // The next append estimates from its own keys.
    DeviceBuffer<float> dk(k);
    gpu.append(dk.get(), dv.get(), n, nullptr);
    auto cpu = cpu_cache(c, s.heads, s.d);
    cpu->append(k.data(), v.data(), n);
    EXPECT_LE(relative_error(gpu.key_center().mean(), vqtest::cpu_key_mean(*cpu)), 1e-5);
}

}  // namespace
}  // namespace veloxquant::cuda
