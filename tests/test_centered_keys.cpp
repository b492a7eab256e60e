// center_keys (methods/centered_key_codec.h): the block centres against a direct double-precision
// average of the turned mean, attention unchanged where the inner codec is near exact (fp16),
// a lower attention error than the uncentred codec on keys with a strong mean, fused against
// unfused attention, dequantize, the cache file, a mean adopted from elsewhere (a device
// cache's estimate), and the configurations that refuse it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/binary_io.h"
#include "methods/centered_key_codec.h"
#include "methods/fp16_codec.h"
#include "rope_test_keys.h"
#include "test_helpers.h"
#include "veloxquant/caches.h"
#include "veloxquant/factory.h"

namespace veloxquant {
namespace {

using vqtest::randn;
using vqtest::reference_attention;
using vqtest::rel_error;
using vqtest::rope_freqs;
using vqtest::rope_keys;
using vqtest::turned;

constexpr int kDim = 64;

// RoPE keys with a strong mean, values, queries [H G][nq][d] and their exact causal attention.
struct Case {
    std::vector<float> keys, values, q, want;
};

Case make_case(int H, int G, int n, int nq, uint64_t seed, float q_scale, bool half_split = false) {
    Case c;
    c.keys = rope_keys(H, n, kDim, rope_freqs(kDim), seed, 3.0, half_split);
    c.values = randn(c.keys.size(), seed + 2);
    c.q = randn(static_cast<std::size_t>(H) * G * nq * kDim, seed + 3, q_scale);
    c.want = reference_attention(c.q, H * G, nq, c.keys, c.values, H, n, kDim,
                                 1.0f / std::sqrt(float(kDim)), true);
    return c;
}

KVCacheConfig centred_config(const std::string& method, int bits, int value_bits, bool centre) {
    KVCacheConfig c;
    c.method = method;
    c.bits = bits;
    c.value_bits = value_bits;
    c.num_residuals = 1;
    c.center_keys = centre;
    c.rope_inv_freq = rope_freqs(kDim);
    return c;
}

// The attention of `cache` after appending keys/values [heads][n][d], for `nq` causal query rows
// of each of `q_heads` heads at the last positions.
std::vector<float> attend(KVCache& cache, const std::vector<float>& q, int q_heads, int nq) {
    std::vector<float> out(q.size());
    cache.attend(q.data(), q_heads, nq, out.data(), 1.0f / std::sqrt(float(kDim)), true);
    return out;
}

// Keys [n][d] that are exactly mu turned to positions 0 .. n - 1.
std::vector<float> turned_mean_keys(const std::vector<double>& mu, const std::vector<double>& freqs,
                                    int n, bool half_split) {
    std::vector<float> keys(static_cast<std::size_t>(n) * kDim);
    for (int t = 0; t < n; ++t) {
        const auto y = turned(mu, freqs, t, half_split);
        for (int j = 0; j < kDim; ++j) keys[t * kDim + j] = static_cast<float>(y[j]);
    }
    return keys;
}

// mu turned to each position of `block` and averaged, in double.
std::vector<float> block_average(const std::vector<double>& mu, const std::vector<double>& freqs,
                                 int64_t block, bool half_split) {
    std::vector<double> sum(kDim, 0.0);
    for (int tau = 0; tau < CenteredKeyCodec::kBlock; ++tau) {
        const auto y = turned(mu, freqs, static_cast<double>(block * 64 + tau), half_split);
        for (int j = 0; j < kDim; ++j) sum[j] += y[j] / CenteredKeyCodec::kBlock;
    }
    return std::vector<float>(sum.begin(), sum.end());
}

TEST(CenteredKeys, BlockCentresAreTheTurnedMeanAveragedOverTheBlock) {
    const std::vector<float> mu_f = randn(kDim, 7);
    const std::vector<double> mu(mu_f.begin(), mu_f.end());
    // Every pair turned, then 12 of 32 (partial RoPE: coordinates from 24 on keep the plain
    // mean), on either pairing.
    for (const std::size_t turned_pairs : {std::size_t{kDim / 2}, std::size_t{12}}) {
        std::vector<double> freqs = rope_freqs(kDim);
        freqs.resize(turned_pairs);
        for (bool half_split : {false, true}) {
            SCOPED_TRACE(testing::Message() << turned_pairs << " pairs, half split " << half_split);
            // Keys that are exactly the turned mean: the estimate must find mu.
            const int n = 200;
            CenteredKeyCodec codec(std::make_unique<FP16Codec>(kDim), freqs, half_split);
            ASSERT_TRUE(codec.needs_training());
            codec.train(turned_mean_keys(mu, freqs, n, half_split).data(), n);
            EXPECT_FALSE(codec.needs_training());
            EXPECT_LT(rel_error(codec.mean(), mu_f), 1e-5);
            std::vector<float> got(kDim);
            // Blocks in the table's four levels and past them (16^4 blocks = 4M positions).
            for (int64_t block : {0LL, 1LL, 17LL, 1000LL, 65535LL, 65536LL, 300000LL}) {
                codec.block_center(block, got.data());
                EXPECT_LT(rel_error(got, block_average(mu, freqs, block, half_split)), 2e-5)
                    << "block " << block;
                for (int j = 2 * static_cast<int>(turned_pairs); j < kDim; ++j)
                    EXPECT_FLOAT_EQ(got[j], mu_f[j]) << j;
            }
        }
    }
}

TEST(CenteredKeys, WithoutRopeTheCentreIsThePlainMean) {
    const int n = 100;
    const std::vector<float> keys = randn(static_cast<std::size_t>(n) * kDim, 3);
    CenteredKeyCodec codec(std::make_unique<FP16Codec>(kDim), {});
    codec.train(keys.data(), n);
    std::vector<float> want(kDim, 0.0f), got(kDim);
    for (int t = 0; t < n; ++t)
        for (int j = 0; j < kDim; ++j) want[j] += keys[t * kDim + j] / n;
    codec.block_center(12345, got.data());
    EXPECT_LT(rel_error(got, want), 1e-5);
}

TEST(CenteredKeys, AShortFirstAppendLeavesTheKeysUncentred) {
    const std::vector<float> keys = randn(8 * kDim, 4);
    CenteredKeyCodec codec(std::make_unique<FP16Codec>(kDim), rope_freqs(kDim));
    codec.train(keys.data(), CenteredKeyCodec::kMinEstimateTokens - 1);
    EXPECT_FALSE(codec.needs_training());
    for (float x : codec.mean()) EXPECT_EQ(x, 0.0f);
    codec.forget_training();
    EXPECT_TRUE(codec.needs_training());
}

TEST(CenteredKeys, Fp16AttentionIsUnchangedAndDequantizeAddsTheCentreBack) {
    const int H = 2, G = 2, n = 300, nq = 3;  // five blocks, the last one partial
    const auto [keys, values, q, want] = make_case(H, G, n, nq, 11, 0.3f);
    for (bool fused : {true, false}) {
        KVCacheConfig c = centred_config("fp16", 4, 16, true);
        c.use_fused_sdpa = fused;
        auto cache = KVCacheFactory::create(c, H, kDim, 1024, 0);
        // 100 tokens estimate the mean, then one at a time
        cache->append(vqtest::token_slice(keys, H, n, kDim, 0, 100).data(),
                      vqtest::token_slice(values, H, n, kDim, 0, 100).data(), 100);
        for (int t = 100; t < n; ++t)
            cache->append(vqtest::token_slice(keys, H, n, kDim, t, t + 1).data(),
                          vqtest::token_slice(values, H, n, kDim, t, t + 1).data(), 1);
        EXPECT_LT(rel_error(attend(*cache, q, H * G, nq), want), 1e-3) << "fused " << fused;
        std::vector<float> k_out(keys.size()), v_out(values.size());
        cache->dequantize(0, n, k_out.data(), v_out.data());
        EXPECT_LT(rel_error(k_out, keys), 1e-3);
    }
}

TEST(CenteredKeys, LowerTheAttentionErrorOfACodecThatScalesWithTheNorm) {
    const int H = 2, G = 4, n = 640, nq = 4;
    const auto [keys, values, q, want] = make_case(H, G, n, nq, 21, 0.4f);
    double err[2];
    for (bool centre : {false, true}) {
        std::vector<float> got[2];
        for (bool fused : {true, false}) {
            KVCacheConfig c = centred_config("turboquant_rvq", 3, 16, centre);
            c.use_fused_sdpa = fused;
            auto cache = KVCacheFactory::create(c, H, kDim, 1024, 0);
            cache->append(keys.data(), values.data(), n);
            got[fused] = attend(*cache, q, H * G, nq);
        }
        // Scores on the codes plus the blocks' offsets against decoded keys plus their centres.
        EXPECT_LT(rel_error(got[1], got[0]), 1e-4) << "centre " << centre;
        err[centre] = rel_error(got[1], want);
    }
    EXPECT_LT(err[1], 0.7 * err[0]) << "uncentred " << err[0] << ", centred " << err[1];
}

TEST(CenteredKeys, HalfSplitRopeKeysNeedTheHalfSplitLayout) {
    // Keys turned as transformers turns them: centring with the matching layout removes the
    // mean at every position; the adjacent layout turns a wrong mean and gains less.
    const int H = 2, G = 4, n = 640, nq = 4;
    const auto [keys, values, q, want] = make_case(H, G, n, nq, 23, 0.4f, true);
    auto error = [&, &keys = keys, &values = values, &q = q, &want = want](bool centre,
                                                                           bool half_split) {
        KVCacheConfig c = centred_config("turboquant_rvq", 3, 16, centre);
        c.rope_half_split = half_split;
        auto cache = KVCacheFactory::create(c, H, kDim, 1024, 0);
        cache->append(keys.data(), values.data(), n);
        return rel_error(attend(*cache, q, H * G, nq), want);
    };
    const double uncentred = error(false, true), matched = error(true, true),
                 mismatched = error(true, false);
    EXPECT_LT(matched, 0.7 * uncentred) << "uncentred " << uncentred << ", centred " << matched;
    EXPECT_LT(matched, 0.7 * mismatched) << "adjacent pairs " << mismatched;
}

TEST(CenteredKeys, TheCacheFileKeepsTheMean) {
    const int H = 2, n = 150;
    const std::vector<double> freqs = rope_freqs(kDim);
    const std::vector<float> keys = rope_keys(H, n, kDim, freqs, 31);
    const std::vector<float> values = randn(keys.size(), 32);
    const std::vector<float> q = randn(static_cast<std::size_t>(H) * 2 * kDim, 33, 0.3f);
    for (const std::string method : {"turboquant_rvq", "rabitq", "half split"}) {
        KVCacheConfig c =
            centred_config(method == "half split" ? "turboquant_rvq" : method, 2, 4, true);
        c.rope_half_split = method == "half split";
        auto cache = KVCacheFactory::create(c, H, kDim, 512, 3);
        cache->append(keys.data(), values.data(), n);
        const std::string path = vqtest::unique_temp_path("centred.bin");
        cache->save(path);
        auto loaded = KVCache::load(path);
        std::remove(path.c_str());
        EXPECT_TRUE(loaded->config().center_keys);
        EXPECT_EQ(loaded->config().rope_half_split, c.rope_half_split);
        EXPECT_EQ(attend(*loaded, q, 2 * H, 1), attend(*cache, q, 2 * H, 1)) << method;
        EXPECT_TRUE(vqtest::save_the_same_file(*loaded, *cache)) << method;
    }
}

TEST(CenteredKeys, LoadStateRefusesABadMean) {
    CenteredKeyCodec codec(std::make_unique<FP16Codec>(kDim), rope_freqs(kDim));
    auto load = [&](uint8_t estimated, std::vector<float> mean) {
        BinaryWriter out;
        out.put<uint8_t>(estimated);
        out.vec(mean);
        BinaryReader in(out.buffer().data(), out.buffer().size());
        codec.load_state(in);
    };
    std::vector<float> mean(kDim, 0.5f);
    EXPECT_NO_THROW(load(1, mean));
    EXPECT_THROW(load(0, mean), std::runtime_error);  // a mean no estimate made
    EXPECT_THROW(load(2, mean), std::runtime_error);
    EXPECT_THROW(load(1, std::vector<float>(kDim - 1, 0.5f)), std::runtime_error);
    mean[5] = NAN;
    EXPECT_THROW(load(1, mean), std::runtime_error);
}

// A device cache estimates the mean on the GPU and its CPU codecs adopt it (adopt_mean): the
// codec then codes and scores as the codec that estimated the same mean itself.
TEST(CenteredKeys, AnAdoptedMeanActsAsTheEstimatedOne) {
    const int n = 200;
    const auto keys = rope_keys(1, n, kDim, rope_freqs(kDim), 77, 3.0, true);
    CenteredKeyCodec estimated(std::make_unique<FP16Codec>(kDim), rope_freqs(kDim), true);
    estimated.train(keys.data(), n);
    CenteredKeyCodec adopted(std::make_unique<FP16Codec>(kDim), rope_freqs(kDim), true);
    std::vector<float> bad = estimated.mean();
    bad[7] = INFINITY;
    EXPECT_THROW(adopted.adopt_mean(bad.data()), std::invalid_argument);
    EXPECT_FALSE(adopted.estimated());
    EXPECT_TRUE(adopted.needs_training());
    adopted.adopt_mean(estimated.mean().data());
    EXPECT_TRUE(adopted.estimated());
    EXPECT_FALSE(adopted.needs_training());
    EXPECT_EQ(adopted.mean(), estimated.mean());
    const int pos0 = 130;  // mid-block: two centres
    std::vector<uint8_t> a(estimated.code_bytes() * n), b(a.size());
    std::vector<float> sa(static_cast<std::size_t>(n) * std::max(1, estimated.num_scalars())),
        sb(sa.size());
    estimated.encode_at(keys.data(), n, pos0, a.data(), sa.data(), n);
    adopted.encode_at(keys.data(), n, pos0, b.data(), sb.data(), n);
    EXPECT_EQ(a, b);
    const auto q = randn(kDim, 78);
    std::vector<float> state_a(estimated.query_state_size()), state_b(state_a.size());
    estimated.prepare_query(q.data(), state_a.data());
    adopted.prepare_query(q.data(), state_b.data());
    std::vector<float> score_a(n), score_b(n);
    estimated.score_at(state_a.data(), a.data(), sa.data(), n, n, pos0, score_a.data());
    adopted.score_at(state_b.data(), b.data(), sb.data(), n, n, pos0, score_b.data());
    EXPECT_EQ(score_a, score_b);
}

TEST(CenteredKeys, ConfigurationsFittedToUncentredKeysRefuseIt) {
    for (const std::string method : {"commvq", "vecinfer", "spectral"}) {
        KVCacheConfig c = centred_config(method, 2, 4, true);
        try {
            c.validate();
            ADD_FAILURE() << method << " accepted center_keys";
        } catch (const std::invalid_argument& e) {
            EXPECT_NE(std::string(e.what()).find("center_keys"), std::string::npos) << e.what();
        }
    }
    KVCacheConfig r = centred_config("rabitq", 2, 4, true);
    EXPECT_NO_THROW(r.validate());
    r.ivf_centroids.shape = {1, 1, 4, kDim};
    r.ivf_centroids.data.assign(4 * kDim, 0.0f);
    EXPECT_THROW(r.validate(), std::invalid_argument);
}

TEST(CenteredKeys, CommvqRefusesHalfSplitRopePairs) {
    KVCacheConfig c = centred_config("commvq", 2, 4, false);
    c.rope_half_split = true;
    try {
        c.validate();
        ADD_FAILURE() << "commvq accepted half-split RoPE pairs";
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("rope_half_split"), std::string::npos) << e.what();
    }
    c.rope_inv_freq.clear();  // no turning at all: nothing to pair
    EXPECT_NO_THROW(c.validate());
}

}  // namespace
}  // namespace veloxquant
