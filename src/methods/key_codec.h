// KeyCodec: how one KV head's key vectors are encoded into fixed-size packed codes, decoded, and
// scored against a query without decoding (the "scorer" half of fused attention).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/binary_io.h"
#include "core/host_device.h"
#include "veloxquant/config.h"

namespace veloxquant {

/// The arguments of a codec's row-scoring kernel (KeyCodec::score_rows_at with one scalar per
/// token, contiguous): rows query states state_stride floats apart, n tokens' codes and scalars,
/// scores score_stride apart.
template <class Codec>
struct ScoreRowsArgs {
    const Codec& codec;
    const float* states;
    std::size_t state_stride;
    int rows;
    const uint8_t* codes;
    const float* scalars;
    int n;
    float* scores;
    std::size_t score_stride;
};

/// Per-token storage is split in two structure-of-arrays parts: `code_bytes()` packed bytes per
/// token (tokens back to back), and `num_scalars()` float32 scalars per token, scalar s of token
/// t at scalars[s * scalar_stride + t]. Pointers passed to encode/decode/score point at the
/// first token of the run; scalar_stride is the page's token capacity.
class KeyCodec {
public:
    explicit KeyCodec(int dim) : dim_(dim) {}
    virtual ~KeyCodec() = default;
    KeyCodec(const KeyCodec&) = delete;
    KeyCodec& operator=(const KeyCodec&) = delete;

    int dim() const { return dim_; }
    virtual std::size_t code_bytes() const = 0;
    virtual int num_scalars() const = 0;

    /// Codecs that learn from data (rabitq's IVF centroids) are trained once, on the keys of
    /// the first append, before their first encode.
    virtual bool needs_training() const { return false; }
    virtual void train(const float* /*keys*/, int /*n*/) {}
    /// Undoes train(), so that needs_training() again (an append that failed after training).
    virtual void forget_training() noexcept {}
    /// How many of n first keys train() reads: rows training_row(i, n, m) for i < m (a codec
    /// that subsamples reads fewer than n). train(those rows in that order, m) trains as
    /// train(keys, n) does, so a device cache copies only them to the host.
    virtual int training_rows(int n) const { return n; }

    /// keys: [n][dim]. Inputs are finite (the cache checks).
    virtual void encode(const float* keys, int n, uint8_t* codes, float* scalars,
                        std::size_t scalar_stride) const = 0;
    /// Writes the reconstruction of n tokens to keys [n][dim].
    virtual void decode(const uint8_t* codes, const float* scalars, std::size_t scalar_stride,
                        int n, float* keys) const = 0;

    /// Floats of per-query state (rotated query, lookup tables, ...).
    virtual std::size_t query_state_size() const = 0;
    virtual void prepare_query(const float* query, float* state) const = 0;
    /// scores[t] = <query, decode(token t)>, computed from the codes (unscaled).
    virtual void score(const float* state, const uint8_t* codes, const float* scalars,
                       std::size_t scalar_stride, int n, float* scores) const = 0;

    /// The cache calls these, with pos0 the position of the run's first token (tokens of a run
    /// are consecutive). Codecs that code keys relative to their RoPE rotation (commvq with a
    /// known RoPE) override them; every other codec ignores positions.
    virtual void encode_at(const float* keys, int n, int /*pos0*/, uint8_t* codes, float* scalars,
                           std::size_t scalar_stride) const {
        encode(keys, n, codes, scalars, scalar_stride);
    }
    virtual void decode_at(const uint8_t* codes, const float* scalars, std::size_t scalar_stride,
                           int n, int /*pos0*/, float* keys) const {
        decode(codes, scalars, scalar_stride, n, keys);
    }
    virtual void score_at(const float* state, const uint8_t* codes, const float* scalars,
                          std::size_t scalar_stride, int n, int /*pos0*/, float* scores) const {
        score(state, codes, scalars, scalar_stride, n, scores);
    }
    /// score_at for `rows` queries: states state_stride floats apart, scores score_stride apart.
    /// Codecs that can share work between queries (reading the codes) override it.
    virtual void score_rows_at(const float* states, std::size_t state_stride, int rows,
                               const uint8_t* codes, const float* scalars,
                               std::size_t scalar_stride, int n, int pos0, float* scores,
                               std::size_t score_stride) const {
        for (int r = 0; r < rows; ++r)
            score_at(states + r * state_stride, codes, scalars, scalar_stride, n, pos0,
                     scores + r * score_stride);
    }

    /// Bytes of codec parameters held (rotation, sketch, centroids, tables).
    virtual std::size_t parameter_bytes() const = 0;
    /// Learned state that is not a pure function of the config (rabitq centroids).
    virtual void save_state(BinaryWriter& /*out*/) const {}
    virtual void load_state(BinaryReader& /*in*/) {}
    /// Throws std::runtime_error when one of n codes (code_bytes() apart), read from a file,
    /// is one encode() cannot produce, such as an IVF cluster id past the centroids. Loading a
    /// cache checks every stored token, so attend and dequantize never meet such a code.
    virtual void check_codes(const uint8_t* /*codes*/, int /*n*/) const {}

private:
    int dim_;
};

/// Row i of the m rows a codec trains on out of n (KeyCodec::training_rows): evenly spaced, the
/// identity when m == n.
VQ_HD int64_t training_row(int i, int n, int m) {
    return static_cast<int64_t>(i) * n / m;
}

/// Trains every head's codec that needs training (rabitq) on the first append's keys
/// [heads][n_tokens][dim], heads in parallel. Throws what the lowest failing head's train()
/// throws (after every head has run).
void train_key_codecs(const std::vector<std::unique_ptr<KeyCodec>>& codecs, const float* keys,
                      int n_tokens);
/// The same for codecs held elsewhere (the inner codecs of centred keys: CenteredKeyCodec).
void train_key_codecs(const std::vector<KeyCodec*>& codecs, const float* keys, int n_tokens);

/// Builds the key codec of `config.method` for one (layer, head); throws std::invalid_argument
/// for a method, bit width or head dim the method cannot take.
std::unique_ptr<KeyCodec> make_key_codec(const KVCacheConfig& config, int head_dim, int layer,
                                         int head);

}  // namespace veloxquant
