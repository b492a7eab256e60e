// Helpers of the centred-key device tests (test_cuda_center_keys, test_cuda_codec_center_keys):
// a CPU cache's key mean, how many dequantized tokens differ from the CPU's, and decode steps of
// a batch of centred sequences against their CPU caches.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda_test_helpers.h"
#include "methods/centered_key_codec.h"
#include "rope_test_keys.h"
#include "veloxquant/caches.h"

namespace vqtest {

/// The pre-RoPE key mean [heads][d] of a CPU cache with center_keys.
inline std::vector<float> cpu_key_mean(const veloxquant::QuantizedKVCache& cpu) {
    std::vector<float> mean;
    for (const auto& codec : cpu.key_codecs()) {
        const auto& m = dynamic_cast<const veloxquant::CenteredKeyCodec&>(*codec).mean();
        mean.insert(mean.end(), m.begin(), m.end());
    }
    return mean;
}

/// Tokens (rows of d floats) of got whose relative error against ref exceeds tol. A device
/// centre differs from the CPU's in rounding only, so a code may flip at a tie now and then.
inline int rows_differing(const std::vector<float>& got, const std::vector<float>& ref, int d,
                          double tol = 1e-4) {
    int bad = 0;
    for (std::size_t row = 0; row < ref.size() / d; ++row) {
        const std::vector<float> a(got.begin() + row * d, got.begin() + (row + 1) * d),
            b(ref.begin() + row * d, ref.begin() + (row + 1) * d);
        bad += relative_error(a, b) > tol;
    }
    return bad;
}

/// Three sequences with their own key means (2, 3, 4 x the noise) under one RoPE (freqs, pairing
/// half_split): 300 and 450 tokens, and a third whose 9-token first append leaves it uncentred
/// beside the centred ones, the shortest for three decode steps, then grown alone by 800 tokens
/// to the longest, whose page phases serve the batch for three more. Each step appends a token a
/// sequence and attends hq query heads through one Batch (CudaTurboQuantBatch, CudaCodecBatch);
/// every sequence's output is checked against its CPU cache within 1e-3. make_cpu() and
/// make_gpu() give a fresh cache of the config under test; the device caches are returned.
template <class Batch, class MakeCpu, class MakeGpu>
auto check_centred_batch_steps(Batch& step, MakeCpu make_cpu, MakeGpu make_gpu, int heads, int d,
                               int hq, const std::vector<double>& freqs, bool half_split,
                               uint64_t seed) {
    const int batch = 3;
    std::vector<decltype(make_cpu())> cpu;
    std::vector<decltype(make_gpu())> gpu;
    auto append_alone = [&](int b, int n, uint64_t key_seed, double mean_scale) {
        const auto k = rope_keys(heads, n, d, freqs, key_seed, mean_scale, half_split);
        const auto v = random_tokens(heads, n, d, key_seed + 10, 0.5f);
        cpu[b]->append(k.data(), v.data(), n);
        DeviceBuffer<float> dk(k), dv(v);
        gpu[b]->append(dk.get(), dv.get(), n, nullptr);
    };
    for (int b = 0; b < batch; ++b) {
        cpu.push_back(make_cpu());
        gpu.push_back(make_gpu());
        append_alone(b, b == 2 ? 9 : 300 + 150 * b, seed + 10 + b, 2.0 + b);
    }
    EXPECT_FALSE(gpu[2]->key_center().centering());
    EXPECT_TRUE(gpu[2]->key_center().estimated());
    std::vector<typename decltype(gpu)::value_type::pointer> all;
    for (auto& g : gpu) all.push_back(g.get());
    const std::size_t per = static_cast<std::size_t>(heads) * d;
    const std::size_t qper = static_cast<std::size_t>(hq) * d;
    for (int round = 0; round < 6; ++round) {
        if (round == 3) append_alone(2, 800, seed + 60, 2.0);
        SCOPED_TRACE("step " + std::to_string(round));
        const auto k = randn(batch * per, seed + 30 + round),
                   v = randn(k.size(), seed + 40 + round, 0.5f);
        DeviceBuffer<float> dk(k), dv(v);
        step.append(all, dk.get(), dv.get(), 1, nullptr);
        const auto q = randn(batch * qper, seed + 50 + round, 0.1f);
        DeviceBuffer<float> dq(q), dout(q.size());
        step.attend({all.begin(), all.end()}, dq.get(), hq, dout.get(), 0.1f, nullptr);
        const auto got = dout.download();
        for (int b = 0; b < batch; ++b) {
            cpu[b]->append(k.data() + b * per, v.data() + b * per, 1);
            std::vector<float> ref(qper);
            cpu[b]->attend(q.data() + b * qper, hq, 1, ref.data(), 0.1f, true);
            const std::vector<float> mine(got.begin() + b * qper, got.begin() + (b + 1) * qper);
            EXPECT_LE(relative_error(mine, ref), 1e-3) << "sequence " << b;
        }
    }
    return gpu;
}

/// Centring cuts a device cache's attention error: one decode over 2048 tokens whose keys carry
/// a strong pre-RoPE mean (config's RoPE), against exact attention, through a cache of `config`
/// uncentred and centred (values stored exact, so the keys' error alone counts) must err at most
/// 0.8 times as much centred. make(config) gives the cache, attend(cache, q, hq, out) decodes.
template <class Make, class Attend>
void check_centring_cuts_error(veloxquant::KVCacheConfig config, Make make, Attend attend,
                               int heads, int d, uint64_t seed) {
    const int n = 2048, hq = 4 * heads;
    const auto k = rope_keys(heads, n, d, config.rope_inv_freq, seed, 3.0, config.rope_half_split);
    const auto v = random_tokens(heads, n, d, seed + 1, 0.5f);
    const auto q = randn(static_cast<std::size_t>(hq) * d, seed + 2, 0.3f);
    const std::vector<float> exact =
        reference_attention(q, hq, 1, k, v, heads, n, d, 0.125f, false);
    config.value_bits = 16;
    double err[2];
    for (const bool centred : {false, true}) {
        config.center_keys = centred;
        auto gpu = make(config);
        DeviceBuffer<float> dk(k), dv(v), dq(q), dout(q.size());
        gpu->append(dk.get(), dv.get(), n, nullptr);
        attend(*gpu, dq.get(), hq, dout.get());
        err[centred] = relative_error(dout.download(), exact);
    }
    EXPECT_LT(err[1], 0.8 * err[0]) << "centred " << err[1] << ", uncentred " << err[0];
}

}  // namespace vqtest
