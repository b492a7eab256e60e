// KVCache: the interface every compressed cache implements.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "veloxquant/config.h"

namespace veloxquant {

/// One layer's key/value cache. Layouts are row-major float32:
///   keys, values: [num_heads][n_tokens][head_dim]
///   queries, out: [num_q_heads][n_queries][head_dim]
/// Query head h reads KV head h / (num_q_heads / num_heads) (grouped-query attention).
/// Every method throws std::invalid_argument (bad arguments) or std::length_error (capacity)
/// before changing anything, and undoes what it did when memory runs out (std::bad_alloc), so a
/// failed call leaves the cache exactly as it was: a call made again gives what it would have.
/// 16-bit float formats of the *_half entry points, passed as raw bits.
enum class HalfFormat {
    kFloat16,   ///< IEEE binary16
    kBFloat16,  ///< bfloat16
};

class KVCache {
public:
    virtual ~KVCache() = default;

    /// Encodes and stores n_tokens new tokens.
    virtual void append(const float* keys, const float* values, int n_tokens) = 0;

    /// Attention of the queries over every stored token. With causal, the n_queries are the
    /// last n_queries tokens appended and query i sees tokens [0, size() - n_queries + i].
    virtual void attend(const float* queries, int num_q_heads, int n_queries, float* out,
                        float scale, bool causal) const = 0;

    /// Reconstructs tokens [start, start + n_tokens) into [num_heads][n_tokens][head_dim].
    virtual void dequantize(int start, int n_tokens, float* keys_out, float* values_out) const = 0;

    /// The same with fp16 or bf16 tensors (same layouts): inputs are widened to float32, which
    /// is exact, so append_half stores what append stores for those values; outputs are
    /// rounded to the nearest 16-bit value (fp16 saturates to infinity past 65504).
    void append_half(const uint16_t* keys, const uint16_t* values, int n_tokens, HalfFormat format);
    void attend_half(const uint16_t* queries, int num_q_heads, int n_queries, uint16_t* out,
                     float scale, bool causal, HalfFormat format) const;
    void dequantize_half(int start, int n_tokens, uint16_t* keys_out, uint16_t* values_out,
                         HalfFormat format) const;
    /// Number of tokens appended (positions), including any evicted by a sliding window.
    virtual int size() const = 0;
    virtual int max_seq_len() const = 0;
    /// Bytes held: packed storage (codes, per-token scalars, page slack, side stores) plus the
    /// codec parameters (rotations, codebooks, centroids).
    virtual std::size_t nbytes() const = 0;
    /// Drops the last n_tokens tokens.
    virtual void trim(int n_tokens) = 0;
    /// Drops every token; trained state (e.g. IVF centroids) is kept.
    virtual void reset() = 0;

    /// Writes a versioned, checksummed file atomically (temporary file, then rename).
    virtual void save(const std::string& path) const = 0;
    /// Reads a file written by save(); throws std::runtime_error on a truncated, corrupted or
    /// forged file.
    static std::unique_ptr<KVCache> load(const std::string& path);

    virtual int num_heads() const = 0;
    virtual int head_dim() const = 0;
    virtual const KVCacheConfig& config() const = 0;
    /// Class name in the seed ("TurboQuantRVQKVCache", ...).
    virtual std::string class_name() const = 0;
};

}  // namespace veloxquant
