// QuantizedKVCache::adopt: another cache's pages and learned codec state become this cache's
// (how the CUDA caches' pages come back to the CPU to be attended, saved and loaded), and every
// bad argument is refused before anything changes.
#include <gtest/gtest.h>

#include <memory>
#include <stdexcept>
#include <vector>

#include "cache/outlier_store.h"
#include "cache/paged_store.h"
#include "methods/key_codec.h"
#include "test_helpers.h"
#include "veloxquant/caches.h"
#include "veloxquant/factory.h"
#include "veloxquant/observer.h"

namespace {

using namespace veloxquant;

std::unique_ptr<QuantizedKVCache> make(const KVCacheConfig& c, int heads, int d) {
    auto made = KVCacheFactory::create(c, heads, d, 1024);
    auto* q = dynamic_cast<QuantizedKVCache*>(made.release());
    return std::unique_ptr<QuantizedKVCache>(q);
}

std::vector<float> attend(const QuantizedKVCache& c, const std::vector<float>& q, int hq) {
    std::vector<float> out(q.size());
    c.attend(q.data(), hq, 1, out.data(), 0.125f, true);
    return out;
}

KVCacheConfig config(const std::string& method) {
    KVCacheConfig c;
    c.method = method;
    c.bits = 2;
    c.value_bits = 4;
    c.num_clusters = 8;
    c.seed = 17;
    return c;
}

class CacheAdopt : public testing::TestWithParam<std::string> {};

TEST_P(CacheAdopt, PagesAndLearnedStateCarryOver) {
    const int H = 2, d = 64, n = 150, hq = 4;
    const KVCacheConfig c = config(GetParam());
    auto a = make(c, H, d), b = make(c, H, d);
    const auto keys = vqtest::randn(static_cast<std::size_t>(H) * n * d, 1);
    const auto values = vqtest::randn(keys.size(), 2);
    a->append(keys.data(), values.data(), n);  // rabitq trains on these keys
    b->adopt(a->paged_store(), a->size(), a->key_codecs());
    EXPECT_EQ(b->size(), n);
    const auto q = vqtest::randn(static_cast<std::size_t>(hq) * d, 3);
    EXPECT_EQ(attend(*a, q, hq), attend(*b, q, hq));
    // The adopted cache keeps going as the original does, and saves and loads.
    const auto k2 = vqtest::randn(static_cast<std::size_t>(H) * 5 * d, 4);
    a->append(k2.data(), k2.data(), 5);
    b->append(k2.data(), k2.data(), 5);
    EXPECT_EQ(attend(*a, q, hq), attend(*b, q, hq));
    const std::string path = vqtest::unique_temp_path("adopted.vqc");
    b->save(path);
    auto loaded = KVCache::load(path);
    std::vector<float> out(q.size());
    loaded->attend(q.data(), hq, 1, out.data(), 0.125f, true);
    EXPECT_EQ(out, attend(*a, q, hq));
    std::remove(path.c_str());
}

// Adopting fewer tokens than the pages hold (a device cache trimmed, or whose last append
// failed, keeps codes past its size in its last page) leaves those slots as a fresh page has
// them: the adopted cache saves the file of its source trimmed to the same size.
TEST_P(CacheAdopt, SlotsPastTheSizeAreNotCarriedOver) {
    const int H = 2, d = 64, n = 150, kept = 100;
    const KVCacheConfig c = config(GetParam());
    auto a = make(c, H, d), b = make(c, H, d);
    const auto keys = vqtest::randn(static_cast<std::size_t>(H) * n * d, 6);
    a->append(keys.data(), keys.data(), n);
    b->adopt(a->paged_store(), kept, a->key_codecs());
    a->trim(n - kept);
    EXPECT_TRUE(vqtest::save_the_same_file(*a, *b));
}

INSTANTIATE_TEST_SUITE_P(Methods, CacheAdopt, testing::Values("turboquant_rvq", "rabitq", "fp16"));

TEST(CacheAdopt, RefusesWhatItCannotHoldAndKeepsItsContents) {
    const int H = 2, d = 64, n = 70;
    auto a = make(config("turboquant_rvq"), H, d), b = make(config("turboquant_rvq"), H, d);
    const auto keys = vqtest::randn(static_cast<std::size_t>(H) * n * d, 5);
    a->append(keys.data(), keys.data(), n);
    b->append(keys.data(), keys.data(), 3);
    KVCacheConfig other = config("turboquant_rvq");
    other.bits = 3;
    auto wider = make(other, H, d);
    EXPECT_THROW(b->adopt(wider->paged_store(), 0, wider->key_codecs()), std::invalid_argument);
    EXPECT_THROW(b->adopt(a->paged_store(), 2000, a->key_codecs()), std::invalid_argument);
    EXPECT_THROW(b->adopt(a->paged_store(), 200, a->key_codecs()),
                 std::invalid_argument);  // page 3
    auto rabitq = make(config("rabitq"), H, d);
    rabitq->append(keys.data(), keys.data(), n);
    EXPECT_THROW(b->adopt(a->paged_store(), n, rabitq->key_codecs()), std::invalid_argument);
    EXPECT_EQ(b->size(), 3);
}

// A cache with an outlier side store adopts the source's entries with its pages (how a device
// cache's side store comes back to the CPU): it flags and attends as the source. Entries it
// cannot keep are refused before anything changes.
TEST(CacheAdopt, TakesTheOutlierEntries) {
    const int H = 2, d = 64, hq = 4, n = 400;
    KVCacheConfig observed = config("turboquant_rvq");
    observed.outlier_observer = std::make_shared<KeyNormObserver>(3.0, 16);
    auto source = make(observed, H, d);
    auto keys = vqtest::randn(static_cast<std::size_t>(H) * n * d, 8);
    for (std::size_t row = 0; row < keys.size() / d; row += 31)  // far longer keys: outliers
        for (int j = 0; j < d; ++j) keys[row * d + j] *= 30.0f;
    const auto values = vqtest::randn(keys.size(), 9);
    source->append(keys.data(), values.data(), n);
    ASSERT_GT(source->outlier_tokens(), 15);
    const auto q = vqtest::randn(static_cast<std::size_t>(hq) * d, 10);

    auto b = make(observed, H, d);
    b->adopt(source->paged_store(), n, source->key_codecs(), source->outlier_store());
    EXPECT_EQ(b->outlier_tokens(), source->outlier_tokens());
    EXPECT_EQ(b->outlier_store()->records(1), source->outlier_store()->records(1));
    EXPECT_EQ(attend(*b, q, hq), attend(*source, q, hq));
    // Without entries the side store is emptied: the flagged tokens come from the pages again.
    auto c = make(observed, H, d);
    c->adopt(source->paged_store(), n, source->key_codecs());
    EXPECT_EQ(c->outlier_tokens(), 0);

    // Refused: entries past the size, for a cache without a side store, of other bits.
    EXPECT_THROW(
        b->adopt(source->paged_store(), 100, source->key_codecs(), source->outlier_store()),
        std::invalid_argument);
    auto plain = make(config("turboquant_rvq"), H, d);
    EXPECT_THROW(
        plain->adopt(source->paged_store(), n, source->key_codecs(), source->outlier_store()),
        std::invalid_argument);
    KVCacheConfig fp16_side = observed;
    fp16_side.outlier_bits = 16;
    auto wide = make(fp16_side, H, d);
    EXPECT_THROW(
        wide->adopt(source->paged_store(), n, source->key_codecs(), source->outlier_store()),
        std::invalid_argument);
    EXPECT_EQ(b->size(), n);
    EXPECT_EQ(b->outlier_tokens(), source->outlier_tokens());
    EXPECT_EQ(plain->size(), 0);
}

// A sliding window's inner cache has evicted pages between its sinks and its window: adopted,
// they stay evicted, and the adopting cache, in a window of the same width, attends as the
// source window does. A store whose last page is gone is refused before anything changes.
TEST(CacheAdoptWindow, KeepsEvictedPagesEvicted) {
    const int H = 2, d = 64, hq = 4;
    const KVCacheConfig c = config("turboquant_rvq");
    SlidingWindowKVCache source(make(c, H, d), 100, 4);
    int n = 0;
    for (const int chunk : {300, 100}) {
        const auto keys = vqtest::randn(static_cast<std::size_t>(H) * chunk * d, 10 + chunk);
        const auto values = vqtest::randn(keys.size(), 20 + chunk);
        source.append(keys.data(), values.data(), chunk);
        n += chunk;
    }
    ASSERT_FALSE(source.inner().position_held(64));  // pages 1 and 2: inside [4, 201)
    auto b = make(c, H, d);
    b->adopt(source.inner().paged_store(), n, source.inner().key_codecs());
    for (int p = 0; p * kTokensPerPage < n; ++p)
        EXPECT_EQ(b->position_held(p * kTokensPerPage),
                  source.inner().position_held(p * kTokensPerPage))
            << "page " << p;
    SlidingWindowKVCache adopted(std::move(b), 100, 4);
    const auto q = vqtest::randn(static_cast<std::size_t>(hq) * d, 3);
    std::vector<float> want(q.size()), got(q.size());
    source.attend(q.data(), hq, 1, want.data(), 0.125f, true);
    adopted.attend(q.data(), hq, 1, got.data(), 0.125f, true);
    EXPECT_EQ(got, want);

    auto gone = make(c, H, d);
    const auto keys = vqtest::randn(static_cast<std::size_t>(H) * 130 * d, 4);
    gone->append(keys.data(), keys.data(), 130);
    gone->evict_range(0, 200);  // every page, the last (positions 128-129) too
    auto target = make(c, H, d);
    target->append(keys.data(), keys.data(), 3);
    EXPECT_THROW(target->adopt(gone->paged_store(), 130, gone->key_codecs()),
                 std::invalid_argument);
    EXPECT_EQ(target->size(), 3);
    EXPECT_TRUE(target->position_held(0));
}

}  // namespace
