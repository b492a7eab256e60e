// Resident-memory accounting checked with an allocation counter: this binary interposes the
// C allocator (malloc, calloc, realloc, free, aligned_alloc, posix_memalign) and counts the live
// bytes, so a cache cannot hide a float copy of keys or values from nbytes().
#include <gtest/gtest.h>
#include <malloc.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>

#include "test_helpers.h"
#include "veloxquant/veloxquant.h"

extern "C" {
void* __libc_malloc(size_t);
void* __libc_calloc(size_t, size_t);
void* __libc_realloc(void*, size_t);
void* __libc_memalign(size_t, size_t);
void __libc_free(void*);
}

namespace {
std::atomic<long long> g_live{0};
void* track(void* p) {
    if (p) g_live += static_cast<long long>(malloc_usable_size(p));
    return p;
}
}  // namespace

extern "C" {
void* malloc(size_t n) {
    return track(__libc_malloc(n));
}
void* calloc(size_t a, size_t b) {
    return track(__libc_calloc(a, b));
}
void free(void* p) {
    if (p) g_live -= static_cast<long long>(malloc_usable_size(p));
    __libc_free(p);
}
void* realloc(void* p, size_t n) {
    if (p) g_live -= static_cast<long long>(malloc_usable_size(p));
    return track(__libc_realloc(p, n));
}
void* aligned_alloc(size_t a, size_t n) {
    return track(__libc_memalign(a, n));
}
void* memalign(size_t a, size_t n) {
    return track(__libc_memalign(a, n));
}
int posix_memalign(void** out, size_t a, size_t n) {
    void* p = __libc_memalign(a, n);
    if (!p) return ENOMEM;
    *out = track(p);
    return 0;
}
}

using namespace veloxquant;

class AllocTest : public ::testing::TestWithParam<std::string> {};

TEST_P(AllocTest, LiveBytesGrowByStorageOnly) {
    const int heads = 8, d = 128, n = 4096;
    const auto k = vqtest::randn(static_cast<std::size_t>(heads) * n * d, 1),
               v = vqtest::randn(k.size(), 2);
    KVCacheConfig cfg;
    cfg.method = GetParam();
    cfg.num_clusters = 16;
    auto made = KVCacheFactory::create(cfg, heads, d, n);
    auto* cache = static_cast<QuantizedKVCache*>(made.get());
    // Warm up per-thread scratch and codebook caches with a throwaway cache, then measure.
    {
        auto warm = KVCacheFactory::create(cfg, heads, d, n);
        warm->append(k.data(), v.data(), 64);
    }
    const long long before = g_live.load();
    const std::size_t storage_before = cache->storage_bytes();
    cache->append(k.data(), v.data(), n);
    const long long grown = g_live.load() - before;
    const long long storage = static_cast<long long>(cache->storage_bytes() - storage_before);
    const long long floats = static_cast<long long>(k.size() + v.size()) * 4;
    // Everything the append kept is the packed storage (plus trained centroids, malloc slack).
    EXPECT_GE(grown, storage * 99 / 100);
    EXPECT_LE(grown, storage * 103 / 100 + 64 * 1024) << "append kept more than its packed storage";
    EXPECT_LT(grown, floats / 4) << "a float copy of the keys or values would show here";
    RecordProperty("storage_bytes", std::to_string(storage));
}

INSTANTIATE_TEST_SUITE_P(Methods, AllocTest,
                         ::testing::Values("turboquant_rvq", "qjl", "polarquant", "rabitq",
                                           "ratequant"),
                         [](const auto& info) { return info.param; });
