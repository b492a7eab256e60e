// SlidingWindowKVCache, the outlier side store, KVCacheBuilder, trim and reset.
#include <gtest/gtest.h>

#include <cmath>

#include "test_helpers.h"
#include "veloxquant/veloxquant.h"

using namespace veloxquant;
using vqtest::randn;
using vqtest::reference_attention;
using vqtest::rel_error;

namespace {

KVCacheConfig tq(int bits = 2) {
    KVCacheConfig c;
    c.method = "turboquant_rvq";
    c.bits = bits;
    c.value_bits = 4;
    return c;
}

std::unique_ptr<QuantizedKVCache> quantized(const KVCacheConfig& c, int heads, int d, int max_len) {
    auto made = KVCacheFactory::create(c, heads, d, max_len);
    return std::unique_ptr<QuantizedKVCache>(static_cast<QuantizedKVCache*>(made.release()));
}

}  // namespace

TEST(SlidingWindow, AttendsSinksAndWindowExactlyWithBoundedMemory) {
    const int heads = 2, group = 2, d = 64, n = 1000, window = 200, sinks = 4;
    const auto k = randn(static_cast<std::size_t>(heads) * n * d, 1), v = randn(k.size(), 2);
    // The unwindowed cache gives the dequantized tokens for the reference.
    auto full = quantized(tq(), heads, d, 4096);
    SlidingWindowKVCache win(quantized(tq(), heads, d, 4096), window, sinks);
    std::size_t peak = 0;
    for (int t = 0; t < n; t += 50) {
        const auto kk = vqtest::token_slice(k, heads, n, d, t, t + 50),
                   vv = vqtest::token_slice(v, heads, n, d, t, t + 50);
        // Held tokens decode identically before and after later evictions (nothing re-encoded).
        full->append(kk.data(), vv.data(), 50);
        win.append(kk.data(), vv.data(), 50);
        peak = std::max(peak, win.nbytes());
    }
    EXPECT_EQ(win.size(), n);
    // Memory is bounded by the window plus one chunk, the sink page and page slack, not by n:
    // at most 7 of the 16 pages the full cache holds.
    EXPECT_LE(win.inner().storage_bytes() * 16, full->storage_bytes() * 7);
    std::vector<float> kd(k.size()), vd(v.size());
    full->dequantize(0, n, kd.data(), vd.data());
    std::vector<float> wk(static_cast<std::size_t>(heads) * window * d), wv(wk.size()),
        fk(wk.size()), fv(wk.size());
    win.dequantize(n - window, window, wk.data(), wv.data());
    full->dequantize(n - window, window, fk.data(), fv.data());
    EXPECT_EQ(wk, fk);
    EXPECT_EQ(wv, fv);
    EXPECT_THROW(win.dequantize(100, 10, wk.data(), wv.data()), std::out_of_range);
    for (bool causal : {false, true}) {
        const int n_q = causal ? 30 : 2;
        const auto q = randn(static_cast<std::size_t>(heads) * group * n_q * d, 3);
        std::vector<float> out(q.size());
        win.attend(q.data(), heads * group, n_q, out.data(), 0.125f, causal);
        const auto ref = reference_attention(q, heads * group, n_q, kd, vd, heads, n, d, 0.125f,
                                             causal, sinks, window);
        EXPECT_LT(rel_error(out, ref), 1e-4) << causal;
    }
    // Trimming back into evicted positions is refused; within the window it works.
    EXPECT_THROW(win.trim(window + 100), std::invalid_argument);
    win.trim(10);
    EXPECT_EQ(win.size(), n - 10);
}

TEST(SlidingWindow, SaveLoadRoundTrip) {
    const int heads = 1, d = 64, n = 300;
    const auto k = randn(static_cast<std::size_t>(heads) * n * d, 4), v = randn(k.size(), 5);
    SlidingWindowKVCache win(quantized(tq(), heads, d, 1024), 100, 2);
    win.append(k.data(), v.data(), n);
    const std::string path = vqtest::unique_temp_path("window.bin");
    win.save(path);
    auto loaded = KVCache::load(path);
    EXPECT_EQ(loaded->class_name(), "SlidingWindowKVCache");
    const auto q = randn(d, 6);
    std::vector<float> a(d), b(d);
    win.attend(q.data(), 1, 1, a.data(), 0.1f, false);
    loaded->attend(q.data(), 1, 1, b.data(), 0.1f, false);
    EXPECT_EQ(a, b);
    EXPECT_EQ(loaded->nbytes(), win.nbytes());
}

TEST(Outliers, FlaggedTokensGoToSideStoreAndShareTheSoftmax) {
    const int heads = 2, group = 2, d = 128, n = 400;
    auto k = randn(static_cast<std::size_t>(heads) * n * d, 7), v = randn(k.size(), 8);
    // Plant tokens with very large and very small key norms (both tails).
    const std::vector<int> big = {50, 210}, small = {0, 333};
    for (int h = 0; h < heads; ++h) {
        for (int t : big)
            for (int j = 0; j < d; ++j) k[(static_cast<std::size_t>(h) * n + t) * d + j] *= 20.0f;
        for (int t : small)
            for (int j = 0; j < d; ++j) k[(static_cast<std::size_t>(h) * n + t) * d + j] *= 0.01f;
    }
    KVCacheConfig cfg = tq(1);
    cfg.outlier_observer = std::make_shared<KeyNormObserver>(4.0, 16);
    auto with = quantized(cfg, heads, d, 1024);
    auto without = quantized(tq(1), heads, d, 1024);
    with->append(k.data(), v.data(), n);
    without->append(k.data(), v.data(), n);
    EXPECT_EQ(with->outlier_tokens(), heads * 4);
    // Dequantize returns the int8 side-store versions for flagged tokens: near-exact.
    std::vector<float> kd(k.size()), vd(v.size());
    with->dequantize(0, n, kd.data(), vd.data());
    for (int t : big) {
        double err = 0, ref = 0;
        for (int j = 0; j < d; ++j) {
            err += std::pow(
                kd[static_cast<std::size_t>(t) * d + j] - k[static_cast<std::size_t>(t) * d + j],
                2);
            ref += std::pow(k[static_cast<std::size_t>(t) * d + j], 2);
        }
        EXPECT_LT(std::sqrt(err / ref), 0.02);
    }
    // Attention merges both stores exactly (fused == reference over the dequantized tokens)...
    const auto q = randn(static_cast<std::size_t>(heads) * group * 3 * d, 9);
    std::vector<float> out(q.size()), out_without(q.size());
    with->attend(q.data(), heads * group, 3, out.data(), 0.09f, true);
    const auto ref = reference_attention(q, heads * group, 3, kd, vd, heads, n, d, 0.09f, true);
    EXPECT_LT(rel_error(out, ref), 1e-4);
    // ...and is closer to exact attention than without the side store.
    without->attend(q.data(), heads * group, 3, out_without.data(), 0.09f, true);
    const auto exact = reference_attention(q, heads * group, 3, k, v, heads, n, d, 0.09f, true);
    EXPECT_LT(rel_error(out, exact), rel_error(out_without, exact));
    // Unfused agrees with fused.
    cfg.use_fused_sdpa = false;
    cfg.outlier_observer = std::make_shared<KeyNormObserver>(4.0, 16);
    auto unfused = quantized(cfg, heads, d, 1024);
    unfused->append(k.data(), v.data(), n);
    std::vector<float> out_unfused(q.size());
    unfused->attend(q.data(), heads * group, 3, out_unfused.data(), 0.09f, true);
    EXPECT_LT(rel_error(out_unfused, out), 1e-4);
    // Trim drops side-store entries past the new end (position 333 goes; 0, 50, 210 stay).
    with->trim(n - 300);
    EXPECT_EQ(with->outlier_tokens(), heads * 3);
    const auto stats = cfg.outlier_observer->stats(0, 0);
    EXPECT_EQ(stats.count, n);
    EXPECT_GT(stats.heterogeneity_ratio(), 100.0);
}

TEST(Builder, OneCachePerLayerWithItsShapeAndSeeds) {
    ModelShape shape;
    shape.layers = {{3, 64}, {3, 64}, {2, 128}};
    auto caches = KVCacheBuilder::build(shape, tq(), 1024);
    ASSERT_EQ(caches.size(), 3u);
    EXPECT_EQ(caches[2]->num_heads(), 2);
    EXPECT_EQ(caches[2]->head_dim(), 128);
    EXPECT_EQ(caches[0]->class_name(), "TurboQuantRVQKVCache");
    // Layers 0 and 1 share a shape but not their rotations.
    const auto k = randn(3 * 10 * 64, 1), v = randn(k.size(), 2);
    caches[0]->append(k.data(), v.data(), 10);
    caches[1]->append(k.data(), v.data(), 10);
    std::vector<float> a(k.size()), b(k.size()), va(k.size()), vb(k.size());
    caches[0]->dequantize(0, 10, a.data(), va.data());
    caches[1]->dequantize(0, 10, b.data(), vb.data());
    EXPECT_NE(a, b);
    EXPECT_THROW(KVCacheBuilder::build(ModelShape{}, tq()), std::invalid_argument);
}

TEST(RateQuant, BitAllocationPerLayerAndHead) {
    KVCacheConfig c;
    c.method = "ratequant";
    c.bits = 2;
    c.bit_allocation = {{"1", 3}, {"1.0", 1}};
    auto l0 = quantized(c, 2, 64, 64);
    auto made = KVCacheFactory::create(c, 2, 64, 64, 1);
    auto* l1 = static_cast<QuantizedKVCache*>(made.get());
    // Layer 0: both heads at 2 bits; layer 1: head 0 at 1 bit, head 1 at 3 bits (avg 2).
    const double scalar_bits = 32.0 / 64;
    EXPECT_NEAR(l0->key_bits_per_coordinate(), 2 + scalar_bits, 1e-9);
    EXPECT_NEAR(l1->key_bits_per_coordinate(), 2 + scalar_bits, 1e-9);
    c.bit_allocation = {{"1", 3}};
    auto l1b = KVCacheFactory::create(c, 2, 64, 64, 1);
    EXPECT_NEAR(static_cast<QuantizedKVCache*>(l1b.get())->key_bits_per_coordinate(),
                3 + scalar_bits, 1e-9);
    const auto k = randn(2 * 64 * 64, 3), v = randn(k.size(), 4);
    l1->append(k.data(), v.data(), 64);
    std::vector<float> kd(k.size()), vd(v.size());
    l1->dequantize(0, 64, kd.data(), vd.data());
    // Head 1 (3 bits) reconstructs better than head 0 (1 bit).
    auto err = [&](int h) {
        double e = 0;
        for (int i = h * 64 * 64; i < (h + 1) * 64 * 64; ++i) e += (kd[i] - k[i]) * (kd[i] - k[i]);
        return e;
    };
    EXPECT_LT(err(1), 0.3 * err(0));
}

TEST(TrimReset, TrimRestoresEarlierStateAndResetEmpties) {
    const int heads = 2, d = 64, n = 130;
    const auto k = randn(static_cast<std::size_t>(heads) * n * d, 1), v = randn(k.size(), 2);
    auto a = quantized(tq(), heads, d, 512), b = quantized(tq(), heads, d, 512);
    const auto k100 = vqtest::token_slice(k, heads, n, d, 0, 100),
               v100 = vqtest::token_slice(v, heads, n, d, 0, 100);
    a->append(k100.data(), v100.data(), 100);
    b->append(k.data(), v.data(), n);
    b->trim(30);
    EXPECT_EQ(b->size(), 100);
    EXPECT_EQ(b->storage_bytes(), a->storage_bytes());
    const auto q = randn(static_cast<std::size_t>(heads) * d, 3);
    std::vector<float> oa(q.size()), ob(q.size());
    a->attend(q.data(), heads, 1, oa.data(), 0.1f, false);
    b->attend(q.data(), heads, 1, ob.data(), 0.1f, false);
    EXPECT_EQ(oa, ob);
    b->reset();
    EXPECT_EQ(b->size(), 0);
    EXPECT_EQ(b->storage_bytes(), 0u);
    b->append(k100.data(), v100.data(), 100);
    b->attend(q.data(), heads, 1, ob.data(), 0.1f, false);
    EXPECT_EQ(oa, ob);
}
