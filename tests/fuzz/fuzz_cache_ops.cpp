// Fuzz target: sequences of calls on a cache, the sequence and the cache read from the input:
// a method without calibration, the outlier store or not, centred keys (center_keys, on either
// RoPE pairing) or not, a sliding window or not, 1 or 2 heads, a capacity of 1..200; then up to
// 24 calls of append (some with a NaN, an infinity or a huge coordinate, in float32, fp16 or
// bf16), trim, attend, dequantize, save and load back, reset. The contract (veloxquant/cache.h): a
// call either succeeds as documented or throws std::invalid_argument, std::length_error or
// std::out_of_range and leaves the cache exactly as it was (its saved file the same bytes); attend
// changes nothing; a saved cache loads back the same tokens. Anything else is a finding.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/half.h"
#include "fuzz_input.h"
#include "veloxquant/veloxquant.h"

namespace {

using namespace veloxquant;

constexpr int kDim = 64, kMaxCalls = 24;

struct Input {
    const uint8_t* p;
    std::size_t n;
    uint8_t next() {
        if (n == 0) return 0;
        --n;
        return *p++;
    }
};

[[noreturn]] void finding(const char* what) {
    std::fprintf(stderr, "fuzz_cache_ops: %s\n", what);
    std::abort();
}

// Tokens [from, size) dequantized, then the size: what a refused call must leave as it was.
std::vector<float> contents(const KVCache& cache, int from) {
    const std::size_t n =
        static_cast<std::size_t>(cache.num_heads()) * (cache.size() - from) * cache.head_dim();
    std::vector<float> kv(2 * n + 1);
    if (n > 0) cache.dequantize(from, cache.size() - from, kv.data(), kv.data() + n);
    kv[2 * n] = static_cast<float>(cache.size());
    return kv;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// The cache's saved file: tokens, codec state, observer statistics.
std::string saved(const KVCache& cache, const std::string& path) {
    cache.save(path);
    FILE* f = std::fopen(path.c_str(), "rb");
    if (f == nullptr) finding("a saved file cannot be read");
    std::string bytes;
    char buf[65536];
    for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) bytes.append(buf, n);
    std::fclose(f);
    return bytes;
}

// Appends k and v as float32 (format 0), fp16 (1) or bf16 (2).
void append_as(KVCache& cache, const std::vector<float>& k, const std::vector<float>& v, int n,
               int format) {
    if (format == 0) return cache.append(k.data(), v.data(), n);
    const bool fp16 = format == 1;
    std::vector<uint16_t> k16(k.size()), v16(v.size());
    for (std::size_t i = 0; i < k.size(); ++i) {
        k16[i] = fp16 ? float_to_half(k[i]) : float_to_bf16(k[i]);
        v16[i] = fp16 ? float_to_half(v[i]) : float_to_bf16(v[i]);
    }
    cache.append_half(k16.data(), v16.data(), n,
                      fp16 ? HalfFormat::kFloat16 : HalfFormat::kBFloat16);
}

std::unique_ptr<KVCache> make_cache(Input& in, int& window) {
    static const char* const kMethods[] = {"turboquant_rvq", "qjl",       "polarquant",
                                           "rabitq",         "ratequant", "fp16"};
    KVCacheConfig config;
    config.method = kMethods[in.next() % 6];
    config.num_clusters = 4;
    const uint8_t flags = in.next();
    if (flags & 1) config.outlier_observer = std::make_shared<KeyNormObserver>(1.5, 4);
    if (flags & 0x40) {
        config.center_keys = true;
        config.rope_half_split = flags & 0x20;  // pairs (i, i + d/2), as transformers turns them
        for (int i = 0; i < kDim / 2; ++i)
            config.rope_inv_freq.push_back(std::pow(10000.0, -2.0 * i / kDim));
    }
    if (config.method == "turboquant_rvq")
        config.bits = 1 + (flags >> 1) % 4, config.value_bits = 1 + (flags >> 3) % 4;
    const int heads = 1 + in.next() % 2, capacity = 1 + in.next() % 200;
    auto made = KVCacheFactory::create(config, heads, kDim, capacity);
    window = 1 << 30;
    if (!(flags & 0x80)) return made;
    window = 8 + in.next() % 100;
    std::unique_ptr<QuantizedKVCache> inner(static_cast<QuantizedKVCache*>(made.release()));
    return std::make_unique<SlidingWindowKVCache>(std::move(inner), window, in.next() % 8);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
    static const std::string path = vqfuzz::temp_path("cache_ops.bin"),
                             state_path = vqfuzz::temp_path("cache_ops_state.bin");
    Input in{data, size};
    int window = 0;
    std::unique_ptr<KVCache> cache = make_cache(in, window);
    const int heads = cache->num_heads();
    uint32_t seed = 1;
    for (int call = 0; call < kMaxCalls && in.n > 0; ++call) {
        const uint8_t op = in.next() % 6;
        // The tokens a sliding window still holds after one more append.
        const int from = std::max(0, cache->size() - (window - 1));
        const std::vector<float> before = contents(*cache, from);
        const std::string before_file = saved(*cache, state_path);
        auto unchanged = [&] {
            return same_bits(contents(*cache, from), before) &&
                   saved(*cache, state_path) == before_file;
        };
        try {
            if (op == 0) {
                const int n = in.next() % 70;
                std::vector<float> k(static_cast<std::size_t>(heads) * n * kDim), v(k.size());
                vqfuzz::fill(k.data(), k.size(), ++seed);
                vqfuzz::fill(v.data(), v.size(), ++seed);
                const uint8_t poison = in.next();
                if (n > 0 && (poison & 3) == 1) k[poison % k.size()] = NAN;
                if (n > 0 && (poison & 3) == 2) v[poison % v.size()] = INFINITY;
                if (n > 0 && (poison & 7) == 3) k[poison % k.size()] *= 1e30f;
                const int size0 = cache->size();
                append_as(*cache, k, v, n, (poison >> 3) % 3);
                if (cache->size() != size0 + n) finding("append did not add its tokens");
            } else if (op == 1) {
                const int n = in.next() % 40, size0 = cache->size();
                cache->trim(n);
                if (cache->size() != size0 - n) finding("trim did not drop its tokens");
            } else if (op == 2) {
                const int nq = 1 + in.next() % 4;
                const bool causal = in.next() & 1;
                std::vector<float> q(static_cast<std::size_t>(2 * heads) * nq * kDim),
                    out(q.size());
                vqfuzz::fill(q.data(), q.size(), ++seed);
                cache->attend(q.data(), 2 * heads, nq, out.data(), 0.125f, causal);
                if (!same_bits(contents(*cache, from), before)) finding("attend changed the cache");
            } else if (op == 3) {
                const int start = in.next() % (cache->size() + 2), n = in.next() % 50;
                std::vector<float> k(static_cast<std::size_t>(heads) * n * kDim + 1), v(k.size());
                cache->dequantize(start, n, k.data(), v.data());
            } else if (op == 4) {
                cache->save(path);
                if (!same_bits(contents(*KVCache::load(path), from), before))
                    finding("a saved cache loads back different tokens");
            } else if (in.next() % 3 == 0) {
                cache->reset();
                if (cache->size() != 0) finding("reset left tokens");
            }
        } catch (const std::invalid_argument&) {
            if (!unchanged()) finding("a refused call changed it");
        } catch (const std::length_error&) {
            if (!unchanged()) finding("a refused call changed it");
        } catch (const std::out_of_range&) {
            if (!unchanged()) finding("a refused call changed it");
        }
    }
    return 0;
}
