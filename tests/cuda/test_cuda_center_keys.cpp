// Centred keys (center_keys) on the device against the CPU's TurboQuantRVQKVCache of the same
// config, on keys with a strong pre-RoPE mean (both RoPE pairings, full and partial RoPE): the
// estimated mean, decode attention (relative error 1e-3) and dequantize, the same attention from
// the CPU's pages and mean uploaded (refused until the mean is set), a batch of sequences with
// different means, the page bias against its definition far into a long context, the gain over
// uncentred keys, the short first append that leaves a cache uncentred, and the refusals. Every
// device test skips cleanly when no CUDA device is present.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "centred_test_helpers.h"
#include "cuda/cuda_cache.h"
#include "cuda/key_center.h"
#include "cuda/turboquant_batch.h"
#include "cuda_test_helpers.h"
#include "rope_test_keys.h"
#include "test_helpers.h"
#include "veloxquant/caches.h"

namespace veloxquant::cuda {
namespace {

using vqtest::DeviceBuffer;
using vqtest::relative_error;

struct Case {
    int d, bits, stages, value_bits, heads, pairs;  // pairs: RoPE frequencies (partial: < d / 2)
    bool half_split;
};

const Case kCases[] = {
    {128, 4, 1, 4, 2, 64, true},   // transformers' pairing
    {128, 2, 2, 2, 2, 32, false},  // partial RoPE, GGUF pairing
    {64, 1, 1, 2, 3, 32, true},
    {64, 3, 1, 4, 2, 16, true},  // partial RoPE, half split
};

std::string name(const Case& c) {
    return "d" + std::to_string(c.d) + " k" + std::to_string(c.bits) + "x" +
           std::to_string(c.stages) + " v" + std::to_string(c.value_bits) + " P" +
           std::to_string(c.pairs) + (c.half_split ? " half" : " adjacent");
}

// Llama's spacing over the 2P turned coordinates.
std::vector<double> freqs_of(const Case& c) {
    return vqtest::rope_freqs(2 * c.pairs);
}

KVCacheConfig config_of(const Case& c, uint64_t seed, bool centred = true) {
    KVCacheConfig k;
    k.method = "turboquant_rvq";
    k.bits = c.bits;
    k.num_residuals = c.stages;
    k.value_bits = c.value_bits;
    k.seed = seed;
    k.center_keys = centred;
    k.rope_inv_freq = freqs_of(c);
    k.rope_half_split = c.half_split;
    return k;
}

TEST(CudaCenterKeys, DeviceCacheMatchesTheCentredCpuCache) {
    SKIP_WITHOUT_DEVICE();
    uint64_t seed = 9100;
    for (const Case& s : kCases) {
        SCOPED_TRACE(name(s));
        const KVCacheConfig c = config_of(s, ++seed);
        const int total = 700;
        const auto keys =
            vqtest::rope_keys(s.heads, total, s.d, freqs_of(s), ++seed, 3.0, s.half_split);
        const auto values = vqtest::random_tokens(s.heads, total, s.d, ++seed, 0.5f);
        TurboQuantRVQKVCache cpu(c, s.heads, s.d, 4096);
        CudaTurboQuantCache gpu(c, s.heads, s.d, 4096);
        int at = 0;
        for (int n : {500, 63, 1, 136}) {
            const auto k = vqtest::token_slice(keys, s.heads, total, s.d, at, at + n),
                       v = vqtest::token_slice(values, s.heads, total, s.d, at, at + n);
            DeviceBuffer<float> dk(k), dv(v);
            cpu.append(k.data(), v.data(), n);
            gpu.append(dk.get(), dv.get(), n, nullptr);
            at += n;
            if (n == 500) {
                ASSERT_TRUE(gpu.key_center().centering());
                EXPECT_LE(relative_error(gpu.key_center().mean(), vqtest::cpu_key_mean(cpu)), 1e-5);
            }
            const int hq = 4 * s.heads;
            const auto q = vqtest::randn(static_cast<std::size_t>(hq) * s.d, ++seed, 0.1f);
            std::vector<float> ref(q.size());
            cpu.attend(q.data(), hq, 1, ref.data(), 0.1f, true);
            DeviceBuffer<float> dq(q), dout(q.size());
            gpu.attend(dq.get(), hq, dout.get(), 0.1f, nullptr);
            EXPECT_LE(relative_error(dout.download(), ref), 1e-3) << "after " << at << " tokens";
        }
        // Dequantize: the centres differ from the CPU's in rounding only, so a code may flip at
        // a tie now and then; every other token matches.
        const std::size_t count = static_cast<std::size_t>(s.heads) * at * s.d;
        std::vector<float> rk(count), rv(count);
        cpu.dequantize(0, at, rk.data(), rv.data());
        DeviceBuffer<float> dk(count), dv(count);
        gpu.dequantize(0, at, dk.get(), dv.get(), nullptr);
        const auto gk = dk.download();
        const int bad = vqtest::rows_differing(gk, rk, s.d);
        EXPECT_LE(bad, static_cast<int>(count / s.d / 100)) << bad << " tokens differ";
        EXPECT_LE(relative_error(gk, rk), 1e-3);
    }
}

TEST(CudaCenterKeys, CpuPagesAndMeanUploadedAttendAsTheCpu) {
    SKIP_WITHOUT_DEVICE();
    uint64_t seed = 9200;
    for (const Case& s : kCases) {
        SCOPED_TRACE(name(s));
        const KVCacheConfig c = config_of(s, ++seed);
        const int n = 1000;
        const auto k = vqtest::rope_keys(s.heads, n, s.d, freqs_of(s), ++seed, 3.0, s.half_split);
        const auto v = vqtest::random_tokens(s.heads, n, s.d, ++seed, 0.5f);
        TurboQuantRVQKVCache cpu(c, s.heads, s.d, 4096);
        cpu.append(k.data(), v.data(), n);
        CudaTurboQuantCache gpu(c, s.heads, s.d, 4096);
        gpu.upload(cpu.paged_store(), n);
        // Pages centred by a mean the cache does not have yet: every read or append refuses.
        const int hq = 2 * s.heads;
        DeviceBuffer<float> dq(static_cast<std::size_t>(hq) * s.d), dout(dq.download().size()),
            dk(static_cast<std::size_t>(s.heads) * n * s.d), dv(dk.download().size());
        EXPECT_THROW(gpu.attend(dq.get(), hq, dout.get(), 0.125f, nullptr), std::invalid_argument);
        EXPECT_THROW(gpu.dequantize(0, n, dk.get(), dv.get(), nullptr), std::invalid_argument);
        EXPECT_THROW(gpu.append(dk.get(), dv.get(), 1, nullptr), std::invalid_argument);
        EXPECT_EQ(gpu.size(), n);
        gpu.set_key_mean(vqtest::cpu_key_mean(cpu));
        const auto q = vqtest::randn(static_cast<std::size_t>(hq) * s.d, ++seed, 0.1f);
        std::vector<float> ref(q.size());
        cpu.attend(q.data(), hq, 1, ref.data(), 0.125f, true);
        check_cuda(cudaMemcpy(dq.get(), q.data(), q.size() * sizeof(float), cudaMemcpyHostToDevice),
                   "queries");
        gpu.attend(dq.get(), hq, dout.get(), 0.125f, nullptr);
        EXPECT_LE(relative_error(dout.download(), ref), 1e-3);
    }
}

TEST(CudaCenterKeys, BatchOfSequencesWithTheirOwnMeans) {
    SKIP_WITHOUT_DEVICE();
    const Case s = kCases[0];
    const KVCacheConfig c = config_of(s, 9300);
    const int hq = 4 * s.heads;
    CudaTurboQuantBatch step;
    const auto gpu = vqtest::check_centred_batch_steps(
        step, [&] { return std::make_unique<TurboQuantRVQKVCache>(c, s.heads, s.d, 4096); },
        [&] { return std::make_unique<CudaTurboQuantCache>(c, s.heads, s.d, 4096); }, s.heads, s.d,
        hq, freqs_of(s), s.half_split, 9300);
    // A batch takes caches of one RoPE only.
    KVCacheConfig other = c;
    other.rope_half_split = false;
    CudaTurboQuantCache odd(other, s.heads, s.d, 4096);
    DeviceBuffer<float> one(static_cast<std::size_t>(s.heads) * s.d * 20);
    odd.append(one.get(), one.get(), 20, nullptr);
    DeviceBuffer<float> dq(static_cast<std::size_t>(2) * hq * s.d), dout(dq.download().size());
    EXPECT_THROW(step.attend({gpu[0].get(), &odd}, dq.get(), hq, dout.get(), 0.1f, nullptr),
                 std::invalid_argument);
}

TEST(CudaCenterKeys, CentringCutsTheAttentionErrorOnTheDevice) {
    SKIP_WITHOUT_DEVICE();
    const Case s = kCases[0];
    vqtest::check_centring_cuts_error(
        config_of(s, 9403),
        [&](const KVCacheConfig& c) {
            return std::make_unique<CudaTurboQuantCache>(c, s.heads, s.d, 4096);
        },
        [](CudaTurboQuantCache& gpu, const float* q, int hq, float* out) {
            gpu.attend(q, hq, out, 0.125f, nullptr);
        },
        s.heads, s.d, 9400);
}

// The page bias of a decode against its definition in double: log2(e) scale <q, c_b> with c_b the
// average of RoPE_p(mu) over the 64 positions p of page b, for sequences far into a long context
// (the phase table's accuracy there), a batch with its own means and lengths, and the phase
// table grown between calls.
TEST(CudaCenterKeys, PageBiasMatchesItsDefinitionFarIntoTheContext) {
    SKIP_WITHOUT_DEVICE();
    uint64_t seed = 9600;
    for (const Case& s : kCases) {
        SCOPED_TRACE(name(s));
        const KVCacheConfig c = config_of(s, ++seed);
        const std::vector<double> freqs = freqs_of(s);
        const int group = 4, hq = group * s.heads, batch = 3;
        const int lens[batch] = {100, 64 * 777 + 5, 300000};  // 2, 778 and 4688 pages
        const int max_pages = (lens[batch - 1] + 63) / 64;
        std::vector<std::unique_ptr<KeyCenter>> centres;
        std::vector<std::vector<float>> means;
        for (int b = 0; b < batch; ++b) {
            centres.push_back(std::make_unique<KeyCenter>(c, s.heads, s.d));
            means.push_back(vqtest::randn(static_cast<std::size_t>(s.heads) * s.d, ++seed));
            centres[b]->set_mean(means[b]);
        }
        std::vector<const float*> damped;
        for (auto& centre : centres) damped.push_back(centre->damped());
        const auto q = vqtest::randn(static_cast<std::size_t>(batch) * hq * s.d, ++seed);
        DeviceBuffer<float> dq(q), bias(static_cast<std::size_t>(batch) * hq * max_pages);
        DeviceBuffer<const float*> ddamped(damped);
        DeviceBuffer<int32_t> dlens(std::vector<int32_t>(lens, lens + batch));
        const float scale = 1.0f / std::sqrt(static_cast<float>(s.d));
        // A short decode first, so that the batch's grows the phases.
        centres[0]->page_bias(centres[0]->damped_address(), dq.get(), 1, hq, nullptr, lens[0], 2,
                              scale, bias.get(), max_pages, nullptr);
        const std::size_t short_bytes = centres[0]->nbytes();
        centres[0]->page_bias(ddamped.get(), dq.get(), batch, hq, dlens.get(), 0, max_pages, scale,
                              bias.get(), max_pages, nullptr);
        check_cuda(cudaDeviceSynchronize(), "page bias");
        EXPECT_GT(centres[0]->nbytes(), short_bytes);  // the phases of 4688 pages
        const auto got = bias.download();
        std::vector<float> ref, sub;
        for (int b = 0; b < batch; ++b) {
            const int pages = (lens[b] + 63) / 64;
            for (int page = 0; page < pages; page += page < 40 || page + 40 > pages ? 1 : 97) {
                // c_b of each KV head, averaged over the page's positions in double.
                std::vector<double> centre(static_cast<std::size_t>(s.heads) * s.d, 0.0);
                for (int h = 0; h < s.heads; ++h) {
                    const std::vector<double> mu(means[b].begin() + h * s.d,
                                                 means[b].begin() + (h + 1) * s.d);
                    for (int t = 0; t < 64; ++t) {
                        const auto turned =
                            vqtest::turned(mu, freqs, 64.0 * page + t, s.half_split);
                        for (int j = 0; j < s.d; ++j) centre[h * s.d + j] += turned[j] / 64.0;
                    }
                }
                for (int qh = 0; qh < hq; ++qh) {
                    double dot = 0.0;
                    for (int j = 0; j < s.d; ++j)
                        dot += double(q[(static_cast<std::size_t>(b) * hq + qh) * s.d + j]) *
                               centre[(qh / group) * s.d + j];
                    ref.push_back(static_cast<float>(dot * scale / std::log(2.0)));
                    sub.push_back(got[(static_cast<std::size_t>(b) * hq + qh) * max_pages + page]);
                }
            }
        }
        EXPECT_LE(relative_error(sub, ref), 2e-5);
    }
}

TEST(CudaCenterKeys, RefusalsLeaveTheCacheAsItWas) {
    SKIP_WITHOUT_DEVICE();
    const Case s = kCases[2];
    CudaTurboQuantCache plain(config_of(s, 9500, false), s.heads, s.d, 256);
    EXPECT_THROW(plain.set_key_mean(std::vector<float>(s.heads * s.d, 1.0f)),
                 std::invalid_argument);
    CudaTurboQuantCache gpu(config_of(s, 9501), s.heads, s.d, 256);
    EXPECT_THROW(gpu.set_key_mean(std::vector<float>(s.heads * s.d - 1, 1.0f)),
                 std::invalid_argument);
    std::vector<float> bad(s.heads * s.d, 1.0f);
    bad[5] = NAN;
    EXPECT_THROW(gpu.set_key_mean(bad), std::invalid_argument);
    EXPECT_FALSE(gpu.key_center().estimated());
    // A first append refused for a NaN key estimates nothing: the next one does.
    auto k = vqtest::rope_keys(s.heads, 64, s.d, freqs_of(s), 9502, 3.0, true);
    const auto v = vqtest::random_tokens(s.heads, 64, s.d, 9503, 0.5f);
    k[7] = NAN;
    DeviceBuffer<float> dbad(k), dv(v);
    EXPECT_THROW(gpu.append(dbad.get(), dv.get(), 64, nullptr), std::invalid_argument);
    EXPECT_FALSE(gpu.key_center().estimated());
    EXPECT_EQ(gpu.size(), 0);
    k[7] = 0.0f;
    DeviceBuffer<float> dk(k);
    gpu.append(dk.get(), dv.get(), 64, nullptr);
    EXPECT_TRUE(gpu.key_center().centering());
}

}  // namespace
}  // namespace veloxquant::cuda
