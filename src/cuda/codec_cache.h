// CudaCodecCache: one layer's cache of any method, resident on the device, through the generic
// device codecs (src/device_codecs/, one thread per token) and kernels (codec_kernels.cuh,
// codec_attention.cuh). Pages have the CPU cache's layout (PagedStore), so the two exchange
// pages, and files through the CPU cache. turboquant_rvq at head_dim 64/128 also has the tuned
// tensor-core decode of CudaTurboQuantCache; this path serves every method, head dim (up to
// 256) and causal prefill.
//
// Scope: the eight methods and fp16 with fp16 or quantized values, a sliding window (window,
// sink_tokens: SlidingWindowKVCache's, its pages taken from and given back to a mapped pool), and
// the outlier side store (config.outlier_observer: DeviceOutlierStore). Codecs that learn from data
// (rabitq's IVF centroids) train on the host, on the first append's keys. Centred keys
// (center_keys, at head_dim <= 128): the first append estimates the pre-RoPE key mean on the device
// (KeyCenter), which the CPU codecs (CenteredKeyCodec) adopt; the pages hold the codes of k - c_b
// and the attention adds each page's <q, c_b> to its scores.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "cache/paged_store.h"
#include "cuda/codec_params_view.h"
#include "cuda/device_outliers.h"
#include "cuda/input_check.h"
#include "cuda/key_center.h"
#include "cuda/page_pool.h"
#include "veloxquant/config.h"
#include "veloxquant/observer.h"

namespace veloxquant {
class BinaryWriter;
class KVCache;
class KeyCodec;
class QuantizedKVCache;
class ValueCodec;
}  // namespace veloxquant

namespace veloxquant::cuda {

/// The sequences a kernel reads or writes: one (its pool; `size` tokens, or for an encode the
/// position of the first new token), or a batch (CudaCodecBatch: sequence b's pages in
/// pools[b], sizes[b] its tokens or first new position, both device arrays, `size` the
/// largest), each through the identity page table. A batch of kin caches also names each
/// sequence's codecs (`kin`); otherwise every sequence has the backend's. An attend of centred
/// keys names each sequence's centre (`center`; its offset is the backend's to set).
struct SequenceSet {
    uint8_t* pool = nullptr;
    const uint8_t* const* pools = nullptr;
    const int32_t* sizes = nullptr;
    const int32_t* page_table = nullptr;
    int batch = 1;
    int size = 0;
    KinParams kin;
    CenterParams center;
    /// Sliding windows (every sequence's alike) and, for a batch of them, each sequence's page
    /// table [batch] and the most tokens one sequence's span holds (TokenWindow).
    TokenWindow window;
    const int32_t* const* page_tables = nullptr;
    int span = 0;
    OutlierView outliers;  ///< one sequence's outlier side store (DeviceOutlierStore::view)
};

/// Appends of at most this many (KV head, token) items, over all sequences, encode one item per
/// CTA (the team encoders, team_encode.cuh: a decode step's latency); longer ones one item per
/// thread (throughput), except for the codecs whose teams are faster there too (codec_backend.cu).
constexpr long long kTeamEncodeMaxItems = 4096;

/// The kernels of one device codec type on one cache's storage (codec_backend.cu).
class CodecBackend {
public:
    virtual ~CodecBackend() = default;
    /// Encodes n tokens of each sequence, at its positions from `size` (sizes[b]) on, from
    /// device keys/values [batch][heads][n][d].
    virtual void encode(const SequenceSet& at, int n, const float* keys, const float* values,
                        cudaStream_t stream) = 0;
    virtual void dequantize(const uint8_t* pool, const int32_t* page_table, int start, int n,
                            float* keys, float* values, cudaStream_t stream) const = 0;
    /// Attention of queries [batch][num_q_heads][n_queries][d] over each sequence's tokens.
    virtual void attend(const SequenceSet& source, const float* queries, int group, int n_queries,
                        float* out, float scale, bool causal, cudaStream_t stream) = 0;
    /// Device bytes of codec parameters and workspace.
    virtual std::size_t nbytes() const = 0;
    /// The largest per-thread stack (local memory) of the kernels that encode appends.
    virtual std::size_t encode_stack_bytes() const = 0;
    /// Where the kernels find this backend's codecs (for a batch of kin caches).
    virtual CodecParamsView params_view() const = 0;
};

/// The backend for config.method built from the CPU codecs of every head (their parameters are
/// copied to the device; with centred keys, the inner codecs); throws std::invalid_argument for a
/// method or shape out of scope.
std::unique_ptr<CodecBackend> make_codec_backend(
    const std::string& method, const std::vector<const KeyCodec*>& keys,
    const std::vector<std::unique_ptr<ValueCodec>>& values, const PageLayout& layout);

class CudaCodecCache {
public:
    /// Throws std::invalid_argument for a config out of scope (head_dim > 256, center_keys at
    /// head_dim > 128, ...). window > 0 makes a sliding window, as
    /// SlidingWindowKVCache(cache, window, sink_tokens): attention sees the first sink_tokens
    /// positions and the last `window` up to each query, and the pages wholly between them are
    /// given back as the cache grows (its memory follows the window, its positions go on to
    /// max_seq_len).
    CudaCodecCache(const KVCacheConfig& config, int num_heads, int head_dim, int max_seq_len = 8192,
                   int layer = 0, int window = 0, int sink_tokens = 4);
    ~CudaCodecCache();
    CudaCodecCache(const CudaCodecCache&) = delete;
    CudaCodecCache& operator=(const CudaCodecCache&) = delete;

    /// Encodes n_tokens device-resident tokens, [num_heads][n_tokens][head_dim]; throws
    /// std::length_error past max_seq_len and std::invalid_argument for NaN, Inf or values
    /// over fp16 storage's range (nothing changes; the check synchronizes the stream). With an
    /// outlier observer, the keys' norms come back with that synchronization, the host's
    /// observer sees them, and the tokens it flags are also kept in the side store (their
    /// vectors come to the host: one more synchronization where a token is flagged). The first
    /// append of a codec that trains (rabitq) rotates the rows it trains on and runs every head's
    /// k-means on the device (the CPU's result bit for bit), then uploads the parameters. A
    /// sliding window then frees the pages wholly inside [sinks,
    /// first new position + 1 - window), as SlidingWindowKVCache::append.
    void append(const float* keys, const float* values, int n_tokens, cudaStream_t stream);
    /// Attention of queries [num_q_heads][n_queries][head_dim] over every stored token (a
    /// sliding window's: its sinks and window); with causal, the queries are the last n_queries
    /// tokens appended (KVCache::attend). std::invalid_argument where a causal query's window
    /// reaches evicted tokens.
    void attend(const float* queries, int num_q_heads, int n_queries, float* out, float scale,
                bool causal, cudaStream_t stream);
    /// Reconstructs tokens [start, start + n_tokens) into device buffers (std::out_of_range for
    /// tokens outside the cache or evicted).
    void dequantize(int start, int n_tokens, float* keys, float* values, cudaStream_t stream) const;

    void reset();
    /// Keeps the first n_tokens tokens (0 <= n_tokens <= size(); std::invalid_argument where a
    /// sliding window's new last token would see evicted positions).
    void truncate(int n_tokens);

    int size() const { return size_; }
    int max_seq_len() const { return max_seq_len_; }
    int num_heads() const { return num_heads_; }
    int head_dim() const { return head_dim_; }
    int device() const { return device_; }
    /// The sliding window's width (0: none) and sink tokens.
    int window() const { return window_.window; }
    int sink_tokens() const { return window_.sinks; }
    /// Whether position pos is stored (not evicted by a sliding window).
    bool position_held(int pos) const;
    /// Tokens held in the outlier side store, over every head (0 without an observer).
    int outlier_tokens() const { return outliers_ ? outliers_->total() : 0; }
    const KVCacheConfig& config() const { return config_; }
    const PageLayout& page_layout() const { return layout_; }
    /// center_keys: the pre-RoPE key mean [num_heads][head_dim] (zeros until the first append).
    const KeyCenter& key_center() const { return center_; }
    /// Device bytes held: pages, page table, codec parameters and workspace, the outlier side
    /// store's mirror.
    std::size_t nbytes() const;
    /// The largest per-thread stack of the kernels that encode appends (0 while a codec that
    /// trains has no kernels: before its first append). The driver reserves a launched kernel's
    /// stack beyond its default 1 KB for every thread the GPU can hold and keeps it: on an
    /// H200 each KB over costs 264 MiB of device memory (docs/cuda.md).
    std::size_t encode_stack_bytes() const { return backend_ ? backend_->encode_stack_bytes() : 0; }

    /// A CPU cache (QuantizedKVCache) of the same config, shape and layer holding these pages
    /// (a sliding window's evicted ones evicted there too) and the codecs' learned state:
    /// attends, saves and loads like any CPU cache. Synchronous.
    std::unique_ptr<QuantizedKVCache> to_host() const;
    /// The CPU cache this one is: to_host(), in a SlidingWindowKVCache of the same window and
    /// sinks where this cache has a window. Synchronous.
    std::unique_ptr<KVCache> host_cache() const;
    /// A device cache holding the pages, outlier entries and learned state of a CPU cache
    /// (head_dim <= 256), on the current device. Synchronous.
    static std::unique_ptr<CudaCodecCache> from_host(const QuantizedKVCache& cpu);
    /// The same of a QuantizedKVCache or a SlidingWindowKVCache around one (the window and
    /// its pages as held); std::invalid_argument for other caches.
    static std::unique_ptr<CudaCodecCache> from_host(const KVCache& cpu);
    /// Writes the cache file of host_cache() (KVCache::save: versioned, checksummed, atomic).
    void save(const std::string& path) const;
    /// Reads a file written by save() (or by a CPU cache of a method this backend serves,
    /// sliding windows included); throws std::runtime_error for a truncated, corrupted or
    /// forged file, and std::invalid_argument for a cache this backend cannot hold.
    static std::unique_ptr<CudaCodecCache> load(const std::string& path);

    /// Copies every page into a CPU store of the same layout (a window's pages not held are
    /// evicted there). Synchronous.
    void download(PagedStore& store) const;
    /// Replaces the contents with the first `size` positions of a CPU store of the same
    /// layout (every page held; a sliding window's: the ones it holds, its last one among
    /// them). Synchronous.
    void upload(const PagedStore& store, int size);

private:
    friend class CudaCodecBatch;  // appends and attends of many sequences at once

    void train_on(const float* keys, int n_tokens, cudaStream_t stream);
    /// Each head's rows of device keys [heads][n_tokens][d].
    std::vector<const float*> head_keys(const float* keys, int n_tokens) const;
    /// Rows training_row(i, n_tokens, rows), i < rows, of device keys [heads][n_tokens][d] on the
    /// host, [heads][rows][d] (synchronizes the stream).
    std::vector<float> training_keys(const float* keys, int n_tokens, int rows,
                                     cudaStream_t stream) const;
    /// The codecs the device kernels run: the key codecs, or with centred keys their inner ones.
    std::vector<const KeyCodec*> device_key_codecs() const;
    /// Encodes n_tokens tokens of device keys [heads][n][d] at positions size_.. (centred
    /// first, with centred keys); does not advance size_.
    void encode_tokens(const float* keys, const float* values, int n_tokens, cudaStream_t stream);
    /// The attend's view of this cache's centre (damped: this cache's own mean; none where it
    /// does not centre), its page phases reserved for size_ tokens.
    CenterParams center_params(cudaStream_t stream) const;
    /// center_params whether or not this cache centres (its mean then zero), with center_keys: a
    /// batch's longest sequence lends its page phases to every sequence, centred or not.
    CenterParams phase_params(cudaStream_t stream) const;
    /// from_host of a CPU cache's pages, with a sliding window (none: window.window = 0).
    static std::unique_ptr<CudaCodecCache> from_host(const QuantizedKVCache& cpu,
                                                     const TokenWindow& window);
    /// Undoes train_on (and the backend it built) after a call that trained fails, as the CPU
    /// cache's append does: a save, or the next append, sees the cache as it was.
    void forget_training() noexcept;
    /// Query heads per KV head of an attend (std::invalid_argument for null queries or out, a
    /// count that is not a multiple of the KV heads, or a scale that is not finite).
    int query_group(const float* queries, float* out, int num_q_heads, float scale) const;
    /// Makes the kernels of the codecs as they are now (trained, if they train) and their
    /// fingerprint.
    void build_backend();
    /// The bytes that make the cache's kind: config, layer and shape.
    BinaryWriter kind_bytes() const;
    /// A sliding window: gives back the pages wholly inside [sinks, keep_from) and drops the
    /// outlier entries there (on `stream`).
    void evict_before(int keep_from, cudaStream_t stream);
    /// With an outlier observer: its statistics of this layer's heads, which an append that
    /// fails restores (observer_restore); empty without one.
    std::vector<KeyNormObserver::Stats> observer_stats() const;
    /// With an outlier observer: lets it see the norms measured of keys [heads][n][d] (the
    /// append's input check synchronized them) and keeps the tokens it flags at positions
    /// first.. (DeviceOutlierStore::add).
    void observe_outliers(const float* keys, const float* values, int n, int first,
                          cudaStream_t stream);
    /// Undoes observe_outliers after an append of positions first.. failed: the observer's
    /// statistics as observer_stats() had them, no entry at first or after.
    void observer_restore(const std::vector<KeyNormObserver::Stats>& stats, int first);

    KVCacheConfig config_;
    int num_heads_, head_dim_, max_seq_len_, layer_;
    int device_ = 0;
    int size_ = 0;
    TokenWindow window_;  ///< a sliding window (window_.window = 0: none)
    PageLayout layout_;
    std::vector<std::unique_ptr<KeyCodec>> key_codecs_;
    std::vector<std::unique_ptr<ValueCodec>> value_codecs_;
    std::unique_ptr<CodecBackend> backend_;  ///< null until trained codecs are trained
    /// With backend_: the codecs' identity (CRC-32 and length of the config's bytes, layer,
    /// shape and learned state). Caches of equal fingerprints share their codecs in a batch.
    uint64_t fingerprint_ = 0;
    /// The same of the config, layer and shape alone: caches of one kind (kin) differ at most in
    /// what their codecs learned, and a batch reads each with its own (CudaCodecBatch).
    uint64_t kind_ = 0;
    std::unique_ptr<DevicePagePool> pages_;
    InputCheck input_check_;
    KeyCenter center_;  ///< centred keys (center_keys): the mean, shifts and page phases
    std::unique_ptr<DeviceOutlierStore> outliers_;  ///< with config.outlier_observer
};

}  // namespace veloxquant::cuda
