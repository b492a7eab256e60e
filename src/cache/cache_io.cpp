// Cache files: "VQKVCACHE" magic, format version, kind, payload length and CRC-32, then the
// payload (config, shape, codec state, pages, outlier store). Written atomically.
#include "cache/cache_io.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cache/outlier_store.h"
#include "cache/paged_store.h"
#include "core/binary_io.h"
#include "methods/key_codec.h"
#include "methods/value_codec.h"
#include "veloxquant/caches.h"
#include "veloxquant/factory.h"
#include "veloxquant/observer.h"

namespace veloxquant {
namespace {

constexpr char kMagic[8] = {'V', 'Q', 'K', 'V', 'C', 'A', 'C', 'H'};
// 2: ivf_centroids, rope_inv_freq; 3: center_keys; 4: rope_half_split (versions 2 and 3 still
// load: uncentred, adjacent pairs).
constexpr uint32_t kFormatVersion = 4;
constexpr uint32_t kOldestFormatVersion = 2;
enum class CacheKind : uint32_t { kQuantized = 1, kSlidingWindow = 2 };

void write_array(BinaryWriter& out, const FloatArray& a) {
    out.vec(a.shape);
    out.vec(a.data);
}

FloatArray read_array(BinaryReader& in) {
    FloatArray a;
    a.shape = in.vec<int64_t>(8);
    a.data = in.vec<float>(std::size_t{1} << 32);
    return a;
}

void write_config(BinaryWriter& out, const KVCacheConfig& c) {
    out.str(c.method);
    for (int v : {c.bits, c.value_bits, c.num_residuals, c.outlier_bits, c.sketch_dim,
                  c.num_clusters, c.num_subspaces.value_or(-1), c.signal_bits, c.noise_bits})
        out.put<int32_t>(v);
    out.put<uint8_t>(c.use_hadamard);
    out.put<uint8_t>(c.use_fused_sdpa);
    out.put<uint64_t>(c.seed);
    write_array(out, c.codebook);
    write_array(out, c.smooth_factors);
    out.put<uint64_t>(c.rotations.size());
    for (const auto& r : c.rotations) write_array(out, r);
    out.put<uint64_t>(c.bit_allocation.size());
    for (const auto& [k, v] : c.bit_allocation) {
        out.str(k);
        out.put<int32_t>(v);
    }
    write_array(out, c.ivf_centroids);
    out.put<uint64_t>(c.rope_inv_freq.size());
    for (double f : c.rope_inv_freq) out.put<double>(f);
    out.put<uint8_t>(c.outlier_observer != nullptr);
    if (c.outlier_observer) {
        out.put<double>(c.outlier_observer->z_threshold());
        out.put<int64_t>(c.outlier_observer->min_count());
    }
    out.put<uint8_t>(c.center_keys);
    out.put<uint8_t>(c.rope_half_split);
}

KVCacheConfig read_config(BinaryReader& in, uint32_t version) {
    KVCacheConfig c;
    c.method = in.str(64);
    int32_t v[9];
    for (auto& x : v) x = in.get<int32_t>();
    c.bits = v[0];
    c.value_bits = v[1];
    c.num_residuals = v[2];
    c.outlier_bits = v[3];
    c.sketch_dim = v[4];
    c.num_clusters = v[5];
    if (v[6] >= 0) c.num_subspaces = v[6];
    c.signal_bits = v[7];
    c.noise_bits = v[8];
    c.use_hadamard = in.get<uint8_t>() != 0;
    c.use_fused_sdpa = in.get<uint8_t>() != 0;
    c.seed = in.get<uint64_t>();
    c.codebook = read_array(in);
    c.smooth_factors = read_array(in);
    const auto n_rot = in.get<uint64_t>();
    if (n_rot > 100000) throw std::runtime_error("corrupted cache file: bad rotation count");
    for (uint64_t i = 0; i < n_rot; ++i) c.rotations.push_back(read_array(in));
    const auto n_alloc = in.get<uint64_t>();
    if (n_alloc > 1000000)
        throw std::runtime_error("corrupted cache file: bad bit_allocation size");
    for (uint64_t i = 0; i < n_alloc; ++i) {
        std::string k = in.str(64);
        c.bit_allocation[k] = in.get<int32_t>();
    }
    c.ivf_centroids = read_array(in);
    const auto n_freq = in.get<uint64_t>();
    if (n_freq > 4096) throw std::runtime_error("corrupted cache file: bad rope_inv_freq size");
    for (uint64_t i = 0; i < n_freq; ++i) c.rope_inv_freq.push_back(in.get<double>());
    if (in.get<uint8_t>()) {
        const double z = in.get<double>();
        const int64_t min_count = in.get<int64_t>();
        try {
            c.outlier_observer = std::make_shared<KeyNormObserver>(z, min_count);
        } catch (const std::invalid_argument& e) {
            throw std::runtime_error(std::string("corrupted cache file: ") + e.what());
        }
    }
    if (version >= 3) {
        const uint8_t centered = in.get<uint8_t>();
        if (centered > 1) throw std::runtime_error("corrupted cache file: bad center_keys flag");
        c.center_keys = centered != 0;
    }
    if (version >= 4) {
        const uint8_t half = in.get<uint8_t>();
        if (half > 1) throw std::runtime_error("corrupted cache file: bad rope_half_split flag");
        c.rope_half_split = half != 0;
    }
    return c;
}

// Per-token scalars of a page: `rows` rows of P floats, the first n in use.
void check_scalars(const float* scalars, int rows, int P, int n, const char* what) {
    for (int r = 0; r < rows; ++r)
        for (int t = 0; t < n; ++t)
            if (!std::isfinite(scalars[static_cast<std::size_t>(r) * P + t]))
                throw std::runtime_error(std::string("corrupted cache file: a non-finite ") + what +
                                         " scalar");
}

std::string frame(CacheKind kind, const std::string& payload) {
    BinaryWriter out;
    out.bytes(kMagic, sizeof kMagic);
    out.put<uint32_t>(kFormatVersion);
    out.put<uint32_t>(static_cast<uint32_t>(kind));
    out.put<uint64_t>(payload.size());
    out.put<uint32_t>(crc32(payload.data(), payload.size()));
    out.bytes(payload.data(), payload.size());
    return out.buffer();
}

}  // namespace

std::string config_bytes(const KVCacheConfig& config) {
    BinaryWriter out;
    write_config(out, config);
    return out.buffer();
}

void QuantizedKVCache::write_body(BinaryWriter& out) const {
    write_config(out, *config_);
    out.put<int32_t>(num_heads_);
    out.put<int32_t>(head_dim_);
    out.put<int32_t>(max_seq_len_);
    out.put<int32_t>(layer_);
    out.str(class_name_);
    out.put<int32_t>(size_);
    for (const auto& kc : key_codecs_) kc->save_state(out);
    if (config_->outlier_observer) {
        for (int h = 0; h < num_heads_; ++h) {
            const KeyNormObserver::Stats s = config_->outlier_observer->stats(layer_, h);
            out.put(s);
        }
        outliers_->write(out);
    }
    out.put<uint64_t>(store_->layout().page_bytes);
    out.put<int32_t>(store_->page_slots());
    for (int p = 0; p < store_->page_slots(); ++p) {
        out.put<uint8_t>(store_->held(p));
        if (store_->held(p)) out.bytes(store_->page_data(p), store_->layout().page_bytes);
    }
}

std::unique_ptr<QuantizedKVCache> QuantizedKVCache::read_body(BinaryReader& in, uint32_t version) {
    KVCacheConfig config = read_config(in, version);
    const int num_heads = in.get<int32_t>();
    const int head_dim = in.get<int32_t>();
    const int max_seq_len = in.get<int32_t>();
    const int layer = in.get<int32_t>();
    const std::string class_name = in.str(64);
    const int size = in.get<int32_t>();
    std::unique_ptr<KVCache> made;
    try {
        made = KVCacheFactory::create(config, num_heads, head_dim, max_seq_len, layer);
    } catch (const std::invalid_argument& e) {
        throw std::runtime_error(std::string("corrupted cache file: ") + e.what());
    }
    std::unique_ptr<QuantizedKVCache> cache(static_cast<QuantizedKVCache*>(made.release()));
    if (cache->class_name_ != class_name)
        throw std::runtime_error("corrupted cache file: class " + class_name +
                                 " does not match method " + config.method);
    if (size < 0 || size > max_seq_len)
        throw std::runtime_error("corrupted cache file: bad token count");
    for (auto& kc : cache->key_codecs_) {
        kc->load_state(in);
        // Codecs train at the first append, so held tokens were coded by a trained codec.
        if (size > 0 && kc->needs_training())
            throw std::runtime_error("corrupted cache file: tokens held but a key codec untrained");
    }
    if (config.outlier_observer) {
        for (int h = 0; h < num_heads; ++h) {
            const auto s = in.get<KeyNormObserver::Stats>();
            if (s.count < 0 || !std::isfinite(s.mean_log) || !(s.m2_log >= 0.0) ||
                !std::isfinite(s.m2_log) || !(s.min_norm >= 0.0) || !(s.max_norm >= s.min_norm) ||
                !std::isfinite(s.max_norm))
                throw std::runtime_error("corrupted cache file: bad key-norm statistics");
            config.outlier_observer->set_stats(layer, h, s);
        }
        cache->outliers_->read(in, size);
    }
    const auto page_bytes = in.get<uint64_t>();
    if (page_bytes != cache->store_->layout().page_bytes)
        throw std::runtime_error("corrupted cache file: page size " + std::to_string(page_bytes) +
                                 " does not match the method's layout (" +
                                 std::to_string(cache->store_->layout().page_bytes) + ")");
    const int slots = in.get<int32_t>();
    const int P = cache->store_->tokens_per_page();
    if (slots != (size + P - 1) / P)
        throw std::runtime_error("corrupted cache file: page count does not match size");
    for (int p = 0; p < slots; ++p) {
        const auto held = in.get<uint8_t>();
        if (held > 1) throw std::runtime_error("corrupted cache file: bad page flag");
        if (held) in.bytes(cache->store_->allocate_page(p), page_bytes);
    }
    if (slots > 0 && !cache->store_->held(slots - 1))
        cache->store_->allocate_page(slots - 1);  // the newest page is always held
    // Content that encode() cannot produce is refused here, so that attend and dequantize
    // never meet it: non-finite per-token scalars, fp16 infinities, out-of-range indices.
    for (int p = 0; p < slots; ++p) {
        if (!cache->store_->held(p)) continue;
        const int n = std::min(P, size - p * P);
        for (int h = 0; h < num_heads; ++h) {
            const HeadLayout& head = cache->store_->layout().heads[h];
            check_scalars(cache->store_->key_scalars(p, h), head.key_scalars, P, n, "key");
            check_scalars(cache->store_->value_scalars(p, h), head.value_scalars, P, n, "value");
            cache->key_codecs_[h]->check_codes(cache->store_->key_codes(p, h), n);
            cache->value_codecs_[h]->check_codes(cache->store_->value_codes(p, h), n);
        }
    }
    // Slots past the tokens are zero, as after append and trim (files of earlier versions kept a
    // trimmed page's old codes there).
    cache->store_->truncate(size);
    cache->size_ = size;
    return cache;
}

void QuantizedKVCache::save(const std::string& path) const {
    BinaryWriter body;
    write_body(body);
    write_file_atomic(path, frame(CacheKind::kQuantized, body.buffer()));
}

void SlidingWindowKVCache::save(const std::string& path) const {
    BinaryWriter body;
    body.put<int32_t>(window_);
    body.put<int32_t>(sinks_);
    inner_->write_body(body);
    write_file_atomic(path, frame(CacheKind::kSlidingWindow, body.buffer()));
}

std::unique_ptr<SlidingWindowKVCache> SlidingWindowKVCache::read_body(BinaryReader& in,
                                                                      uint32_t version) {
    const int window = in.get<int32_t>();
    const int sinks = in.get<int32_t>();
    auto inner = QuantizedKVCache::read_body(in, version);
    try {
        return std::make_unique<SlidingWindowKVCache>(std::move(inner), window, sinks);
    } catch (const std::invalid_argument& e) {
        throw std::runtime_error(std::string("corrupted cache file: ") + e.what());
    }
}

std::unique_ptr<KVCache> KVCache::load(const std::string& path) {
    const std::string data = read_file(path);
    BinaryReader head(data.data(), data.size());
    char magic[sizeof kMagic];
    head.bytes(magic, sizeof magic);
    if (std::memcmp(magic, kMagic, sizeof kMagic) != 0)
        throw std::runtime_error(path + " is not a VeloxQuant cache file (bad magic)");
    const auto version = head.get<uint32_t>();
    if (version < kOldestFormatVersion || version > kFormatVersion)
        throw std::runtime_error(path + ": unsupported cache format version " +
                                 std::to_string(version) + " (this build reads " +
                                 std::to_string(kOldestFormatVersion) + ".." +
                                 std::to_string(kFormatVersion) + ")");
    const auto kind = head.get<uint32_t>();
    const auto length = head.get<uint64_t>();
    const auto crc = head.get<uint32_t>();
    if (length != head.remaining())
        throw std::runtime_error(path + ": truncated cache file (payload " +
                                 std::to_string(head.remaining()) + " of " +
                                 std::to_string(length) + " bytes)");
    const char* payload = data.data() + (data.size() - length);
    if (crc32(payload, length) != crc)
        throw std::runtime_error(path + ": corrupted cache file (CRC mismatch)");
    BinaryReader in(payload, length);
    std::unique_ptr<KVCache> cache;
    if (kind == static_cast<uint32_t>(CacheKind::kQuantized))
        cache = QuantizedKVCache::read_body(in, version);
    else if (kind == static_cast<uint32_t>(CacheKind::kSlidingWindow))
        cache = SlidingWindowKVCache::read_body(in, version);
    else
        throw std::runtime_error(path + ": unknown cache kind " + std::to_string(kind));
    if (in.remaining() != 0)
        throw std::runtime_error(path + ": corrupted cache file (trailing bytes)");
    return cache;
}

}  // namespace veloxquant
