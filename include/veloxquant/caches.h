// The concrete caches: one generic quantized cache over a key codec and a value codec, named
// per method as in the seed, and the sliding-window wrapper.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "veloxquant/cache.h"
#include "veloxquant/config.h"

namespace veloxquant {

class BinaryReader;
class BinaryWriter;
class KeyCodec;
class ValueCodec;
class PagedStore;
class OutlierStore;

/// Tokens per storage page: memory grows by one page per KV head at a time.
constexpr int kTokensPerPage = 64;

/// A cache whose keys go through config.method's codec and whose values go through the value
/// codec (value_bits), stored packed in pages; attention runs on the codes when
/// config.use_fused_sdpa, else on dequantized blocks. Tokens whose key norm is flagged by
/// config.outlier_observer are also kept at outlier_bits in a side store and attended from it.
class QuantizedKVCache : public KVCache {
public:
    QuantizedKVCache(const KVCacheConfig& config, int num_heads, int head_dim, int max_seq_len,
                     int layer, std::string class_name);
    /// The same over a configuration shared with the other layers' caches (KVCacheBuilder):
    /// calibration arrays of every layer are then held once per model, not once per layer.
    QuantizedKVCache(std::shared_ptr<const KVCacheConfig> config, int num_heads, int head_dim,
                     int max_seq_len, int layer, std::string class_name);
    ~QuantizedKVCache() override;

    void append(const float* keys, const float* values, int n_tokens) override;
    void attend(const float* queries, int num_q_heads, int n_queries, float* out, float scale,
                bool causal) const override;
    void dequantize(int start, int n_tokens, float* keys_out, float* values_out) const override;
    int size() const override { return size_; }
    int max_seq_len() const override { return max_seq_len_; }
    std::size_t nbytes() const override;
    void trim(int n_tokens) override;
    void reset() override;
    void save(const std::string& path) const override;
    int num_heads() const override { return num_heads_; }
    int head_dim() const override { return head_dim_; }
    const KVCacheConfig& config() const override { return *config_; }
    std::string class_name() const override { return class_name_; }

    int layer() const { return layer_; }
    /// Packed storage: pages (codes, per-token scalars, slack) and the outlier side store.
    std::size_t storage_bytes() const;
    /// Codec parameters: rotations, sketches, codebooks, centroids.
    std::size_t parameter_bytes() const;
    /// Exact bits per coordinate of one token's keys and values (codes and scalars, no slack).
    double key_bits_per_coordinate() const;
    double value_bits_per_coordinate() const;
    /// Tokens currently held in the outlier side store (all heads).
    int outlier_tokens() const;

    /// Attention restricted, for a query at position q, to the sink tokens [0, sinks) and the
    /// window (q - window, q]; window <= 0 means no restriction. Used by SlidingWindowKVCache;
    /// evicted pages must lie outside every query's attended set.
    void attend_window(const float* queries, int num_q_heads, int n_queries, float* out,
                       float scale, bool causal, int sinks, int window) const;
    /// Frees every page whose positions all lie in [sinks, keep_from), and the outlier entries
    /// in that range.
    void evict_range(int sinks, int keep_from);
    /// Whether position pos is stored (not evicted).
    bool position_held(int pos) const;
    /// The pages (the CUDA caches exchange pages of this layout).
    const PagedStore& paged_store() const { return *store_; }
    /// The key codec of every KV head (their learned state, e.g. rabitq's centroids).
    const std::vector<std::unique_ptr<KeyCodec>>& key_codecs() const { return key_codecs_; }
    /// Replaces the contents with positions [0, size) of `pages` (this cache's page layout;
    /// pages in its table it does not hold, a sliding window's evicted ones, stay evicted) and
    /// the learned state of `codecs` (one per head, of this cache's method), and where this
    /// cache keeps an outlier side store, `outliers`' entries (null: none): how a device cache's
    /// pages become a CPU cache, e.g. to be saved. Throws std::invalid_argument, before changing
    /// anything, for another layout, a size past max_seq_len, a page past the table or a last
    /// page not held, codecs of another count or method, and outlier entries this cache cannot
    /// keep (it has no side store, or one of other bits or shape, or an entry at or past size).
    void adopt(const PagedStore& pages, int size,
               const std::vector<std::unique_ptr<KeyCodec>>& codecs,
               const OutlierStore* outliers = nullptr);
    /// The outlier side store (null without config.outlier_observer).
    const OutlierStore* outlier_store() const { return outliers_.get(); }

    /// Serialization body shared with SlidingWindowKVCache; read_body reads a file of format
    /// `version` (cache_io.cpp).
    void write_body(BinaryWriter& out) const;
    static std::unique_ptr<QuantizedKVCache> read_body(BinaryReader& in, uint32_t version);

private:
    void check_tokens(const float* keys, const float* values, int n_tokens) const;
    /// Adds the keys' norms to the outlier observer; which tokens it flags, [heads][n_tokens]
    /// (empty without an observer).
    std::vector<uint8_t> observe_key_norms(const float* keys, int n_tokens) const;
    void encode_tokens(const float* keys, const float* values, int n_tokens,
                       const std::vector<uint8_t>& outlier_flags);

    std::shared_ptr<const KVCacheConfig> config_;
    int num_heads_;
    int head_dim_;
    int max_seq_len_;
    int layer_;
    std::string class_name_;
    int size_ = 0;
    std::vector<std::unique_ptr<KeyCodec>> key_codecs_;
    std::vector<std::unique_ptr<ValueCodec>> value_codecs_;
    std::unique_ptr<PagedStore> store_;
    std::unique_ptr<OutlierStore> outliers_;
};

#define VQ_DECLARE_METHOD_CACHE(Name)                                                          \
    class Name : public QuantizedKVCache {                                                     \
    public:                                                                                    \
        Name(const KVCacheConfig& config, int num_heads, int head_dim, int max_seq_len = 8192, \
             int layer = 0)                                                                    \
            : QuantizedKVCache(config, num_heads, head_dim, max_seq_len, layer, #Name) {}      \
        Name(std::shared_ptr<const KVCacheConfig> config, int num_heads, int head_dim,         \
             int max_seq_len, int layer)                                                       \
            : QuantizedKVCache(std::move(config), num_heads, head_dim, max_seq_len, layer,     \
                               #Name) {}                                                       \
    };

VQ_DECLARE_METHOD_CACHE(TurboQuantRVQKVCache)
VQ_DECLARE_METHOD_CACHE(QJLKVCache)
VQ_DECLARE_METHOD_CACHE(PolarQuantKVCache)
VQ_DECLARE_METHOD_CACHE(RaBitQKVCache)
VQ_DECLARE_METHOD_CACHE(CommVQKVCache)
VQ_DECLARE_METHOD_CACHE(RateQuantKVCache)
VQ_DECLARE_METHOD_CACHE(SpectralQuantKVCache)
VQ_DECLARE_METHOD_CACHE(VecInferKVCache)
VQ_DECLARE_METHOD_CACHE(FP16KVCache)
#undef VQ_DECLARE_METHOD_CACHE

/// Keeps the most recent `window` tokens plus the first `sink_tokens` of an inner cache
/// (StreamingLLM-style attention sinks). Whole pages that fall out are freed in place; nothing
/// is re-encoded. Positions keep counting, so size() is the number of tokens ever appended
/// (bounded by the inner cache's max_seq_len) while memory stays bounded by the window.
class SlidingWindowKVCache : public KVCache {
public:
    SlidingWindowKVCache(std::unique_ptr<QuantizedKVCache> inner, int window, int sink_tokens = 4);

    void append(const float* keys, const float* values, int n_tokens) override;
    void attend(const float* queries, int num_q_heads, int n_queries, float* out, float scale,
                bool causal) const override;
    /// Only tokens still held can be dequantized; asking for an evicted one throws.
    void dequantize(int start, int n_tokens, float* keys_out, float* values_out) const override;
    int size() const override { return inner_->size(); }
    int max_seq_len() const override { return inner_->max_seq_len(); }
    std::size_t nbytes() const override { return inner_->nbytes(); }
    /// Trimming back into evicted positions throws std::invalid_argument.
    void trim(int n_tokens) override;
    void reset() override { inner_->reset(); }
    void save(const std::string& path) const override;
    int num_heads() const override { return inner_->num_heads(); }
    int head_dim() const override { return inner_->head_dim(); }
    const KVCacheConfig& config() const override { return inner_->config(); }
    std::string class_name() const override { return "SlidingWindowKVCache"; }

    int window() const { return window_; }
    int sink_tokens() const { return sinks_; }
    const QuantizedKVCache& inner() const { return *inner_; }
    static std::unique_ptr<SlidingWindowKVCache> read_body(BinaryReader& in, uint32_t version);

private:
    std::unique_ptr<QuantizedKVCache> inner_;
    int window_;
    int sinks_;
};

}  // namespace veloxquant
