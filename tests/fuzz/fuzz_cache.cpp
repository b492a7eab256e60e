// Fuzz target: KVCache::load on cache files with arbitrary payloads (the CRC is made valid, so
// forged content reaches the parser). A file either throws std::runtime_error or loads a cache
// that dequantizes, attends, appends, trims and saves, and whose saved copy loads back to the
// same contents. Anything else (a crash, a sanitizer report, another exception) is a finding.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "fuzz_input.h"
#include "veloxquant/veloxquant.h"

namespace {

using veloxquant::KVCache;

// Header: magic (8), format version (4), kind (4), payload length (8), payload CRC-32 (4).
constexpr std::size_t kLengthAt = 16, kCrcAt = 24, kPayloadAt = 28;
// Caches whose dequantized contents exceed this many floats are loaded but not exercised.
constexpr std::size_t kMaxFloats = std::size_t{1} << 20;

[[noreturn]] void finding(const char* what) {
    std::fprintf(stderr, "fuzz_cache: %s\n", what);
    std::abort();
}

// The last `count` tokens, dequantized.
std::vector<float> contents(const KVCache& cache, int count) {
    const std::size_t n = static_cast<std::size_t>(cache.num_heads()) * count * cache.head_dim();
    std::vector<float> kv(2 * n);
    if (n > 0) cache.dequantize(cache.size() - count, count, kv.data(), kv.data() + n);
    return kv;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void exercise(KVCache& cache, const std::string& path) {
    const int h = cache.num_heads(), d = cache.head_dim(), n = cache.size();
    if (static_cast<std::size_t>(h) * (n + 1) * d > kMaxFloats) return;
    // A sliding window holds its last `window` tokens; one more append may free the oldest page.
    const auto* window = dynamic_cast<const veloxquant::SlidingWindowKVCache*>(&cache);
    const int held = window != nullptr ? std::min(n, window->window() - 1) : n;
    const std::vector<float> before = contents(cache, held);
    std::vector<float> q(static_cast<std::size_t>(2 * h) * 2 * d), out(q.size());
    vqfuzz::fill(q.data(), q.size(), 7);
    if (n > 0) {
        cache.attend(q.data(), 2 * h, 1, out.data(), 0.125f, false);
        cache.attend(q.data(), 2 * h, std::min(n, 2), out.data(), 0.125f, true);
    }
    // Saved and loaded back, the cache holds the same bytes (NaN payloads compare as bits).
    cache.save(path);
    if (!same_bits(contents(*KVCache::load(path), held), before))
        finding("a saved copy of a loaded cache loads back different");
    std::vector<float> k(static_cast<std::size_t>(h) * d), v(k.size());
    vqfuzz::fill(k.data(), k.size(), 11);
    vqfuzz::fill(v.data(), v.size(), 13);
    try {
        cache.append(k.data(), v.data(), 1);
    } catch (const std::length_error&) {
        return;  // the file's cache was full
    }
    if (cache.size() != n + 1) finding("append did not add one token");
    if (window != nullptr) return;  // the append may have freed a page that trim would need
    cache.trim(1);
    if (!same_bits(contents(cache, held), before)) finding("append then trim changed the cache");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
    static const std::string path = vqfuzz::temp_path("cache.bin");
    static const std::string copy = vqfuzz::temp_path("cache_copy.bin");
    const std::string bytes =
        vqfuzz::with_valid_checksum(data, size, kLengthAt, kCrcAt, kPayloadAt);
    veloxquant::write_file_atomic(path, bytes);
    std::unique_ptr<KVCache> cache;
    try {
        cache = KVCache::load(path);
    } catch (const std::runtime_error& e) {
        vqfuzz::rejected(e);
        return 0;  // the expected outcome for most inputs
    }
    exercise(*cache, copy);
    return 0;
}
