// CUDA backend for turboquant_rvq keys and the value codec: the packed page layout shared with
// the CPU (src/cache/paged_store.h), raw launchers on device pointers and a stream
// (turboquant_launch.cu), and a device-resident cache (cuda_cache.cu).
//
// Scope: head_dim 64 or 128 with the randomized Hadamard rotation; key bits 1..4 with 1..3
// stages; value_bits 1, 2, 4 or 16; decode attention (one query per query head, GQA groups of
// 1..8 query heads); centred keys (center_keys, key_center.h); sliding windows (window,
// sink_tokens; not with centred keys); no outlier side store.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cache/paged_store.h"
#include "cuda/codec_params_view.h"
#include "cuda/input_check.h"
#include "cuda/key_center.h"
#include "cuda/page_pool.h"
#include "veloxquant/caches.h"
#include "veloxquant/config.h"

namespace veloxquant::cuda {

/// One KV head's block inside a page, exactly the CPU PageLayout of a turboquant_rvq cache
/// (P = 64 tokens, every region 64-byte aligned). Offsets are relative to the head block, which
/// starts at page + head * head_bytes:
///   key codes      [P][key_code_bytes]     stages back to back, LSB-first packed indices
///   key norms      [P]                      float32
///   value codes    [P][value_code_bytes]   packed indices, or fp16 when value_bits == 16
///   value scales   [P]                      float32 (absent when value_bits == 16)
struct TqPageLayout {
    int head_dim = 0;
    int key_bits = 0;
    int key_stages = 0;
    int value_bits = 0;
    int num_kv_heads = 0;
    uint32_t key_stage_bytes = 0;   ///< packed_bytes(head_dim, key_bits)
    uint32_t key_code_bytes = 0;    ///< key_stages * key_stage_bytes
    uint32_t value_code_bytes = 0;  ///< packed_bytes(head_dim, value_bits) or 2 * head_dim
    uint32_t key_norms_offset = 0;
    uint32_t value_codes_offset = 0;
    uint32_t value_scales_offset = 0;
    uint32_t head_bytes = 0;  ///< stride between heads; a multiple of 64
    uint64_t page_bytes = 0;  ///< num_kv_heads * head_bytes
};

/// Codec parameters on the device (one set per cache; the codebooks depend only on head_dim and
/// the bit widths, the rotation signs on (seed, layer, head)).
struct TqDeviceTables {
    const float* key_signs = nullptr;         ///< [num_kv_heads][head_dim], +-1
    const float* value_signs = nullptr;       ///< [num_kv_heads][head_dim], +-1
    const float* key_centroids = nullptr;     ///< [key_stages][2^key_bits]
    const float* key_boundaries = nullptr;    ///< [key_stages][2^key_bits - 1]
    const float* value_centroids = nullptr;   ///< [2^value_bits] (none for fp16)
    const float* value_boundaries = nullptr;  ///< [2^value_bits - 1]
    /// key_bits >= 2: [key_stages][2^(2 key_bits)] half2 (C[i0], C[i1]) / max|C| at index
    /// i0 | i1 << bits (the largest centroid is exact in fp16).
    const uint32_t* key_pairs = nullptr;
    /// [key_stages][2]: (C[0], C[1] - C[0]) for key_bits == 1, else (0, max|C|).
    const float* key_affine = nullptr;
    /// key_bits == 2: [key_stages][2] words whose byte a holds the high / low signed 8-bit part
    /// (K = 256 high + low) of K = rint(C[a] / max|C| * kKeyI8Scale), for integer scores.
    const uint32_t* key_i8 = nullptr;
    /// key_bits == 2: key_i8 again with every stage in one scale, the largest |C| of any stage
    /// (K = rint(C[a] / that * kKeyI8Scale)), so that a decode may sum the stages' integer
    /// scores before one conversion (two head blocks, decode_scores.cuh); key_i8_joint_weight =
    /// that largest |C| / kKeyI8Scale turns the sum back into a score.
    const uint32_t* key_i8_joint = nullptr;
    float key_i8_joint_weight = 1.0f;
    /// value_bits <= 4: [2^(2 value_bits)] half2 (C[iA], C[iB]) / value_pair_scale at index
    /// iA | iB << bits. Equal to key_pairs (the pointer) when the table is the key stage 0's, as
    /// at 4-bit keys and values: the decode then keeps one copy of it.
    const uint32_t* value_pairs = nullptr;
    float value_pair_scale = 1.0f;  ///< max|C| of the value codebook
    float key_c0_sum = 0.0f;        ///< sum over stages of C_s[0] (key_bits == 1)
    float inv_sqrt_d = 0.0f;        ///< 1 / sqrt(head_dim), computed as the CPU's fwht does
};

/// The 16-bit fixed-point scale of key_i8 (and of the decode's queries): |K| <= 32512 keeps the
/// high part within [-127, 127].
constexpr float kKeyI8Scale = 32512.0f;

/// Appends of fewer tokens than this (decode steps) take an encoder that spreads each token over
/// D / 8 lanes, for latency, and may hold a batch of sequences (EncodeArgs::pools); longer ones
/// take the bulk encoders, D / 32 lanes a token for throughput, one sequence a launch (the
/// batch's indexing cost them 2-5%: bench/results/cuda_h100_20261205zx_batched_appends.md).
constexpr int kShortAppendTokens = 32;

/// Encode n_tokens new tokens at positions [start, start + n_tokens) of one sequence, or, under
/// kShortAppendTokens, of each of `batch` sequences, each in its own pool from its own first
/// position.
struct EncodeArgs {
    TqPageLayout layout;
    TqDeviceTables tables;
    uint8_t* pool = nullptr;              ///< page pool
    const int32_t* page_table = nullptr;  ///< page index in the pool of each page of the sequence
    int start = 0;
    int n_tokens = 0;
    const float* keys = nullptr;    ///< [batch][num_kv_heads][n_tokens][head_dim]
    const float* values = nullptr;  ///< [batch][num_kv_heads][n_tokens][head_dim]
    /// [batch] device arrays, or null (batch 1: `pool` from `start`): sequence b's pages lie in
    /// pools[b] under page_table, its tokens from position starts[b] (CudaTurboQuantBatch).
    uint8_t* const* pools = nullptr;
    const int32_t* starts = nullptr;
    /// With pools: [batch] device pointers to each sequence's own page table (sliding windows'
    /// mapped pools), read instead of page_table; or null.
    const int32_t* const* page_tables = nullptr;
    int batch = 1;
};

/// Reconstruct tokens [start, start + n_tokens) of one sequence.
struct DequantizeArgs {
    TqPageLayout layout;
    TqDeviceTables tables;
    const uint8_t* pool = nullptr;
    const int32_t* page_table = nullptr;
    int start = 0;
    int n_tokens = 0;
    float* keys = nullptr;    ///< [num_kv_heads][n_tokens][head_dim]
    float* values = nullptr;  ///< [num_kv_heads][n_tokens][head_dim]
};

/// Decode attention of `batch` independent sequences, one query per query head each.
struct DecodeArgs {
    TqPageLayout layout;
    TqDeviceTables tables;
    const uint8_t* pool = nullptr;
    /// [batch] device pointers, or null: sequence b's pages lie in pools[b] (one cache per
    /// sequence, CudaTurboQuantBatch), else all of them in `pool`.
    const uint8_t* const* pools = nullptr;
    const int32_t* page_table = nullptr;  ///< [batch][page_table_stride] page indices
    int page_table_stride = 0;
    /// [batch] device pointers, or null: sequence b's own page table (a sliding window's mapped
    /// pool), read instead of page_table's row b.
    const int32_t* const* page_tables = nullptr;
    /// A sliding window, every sequence's alike (window.window = 0: none): the query of a
    /// sequence of length n attends positions [0, sinks) and [n - window, n). Each CTA walks the
    /// sink pages and then the pages from the window's first on (TokenWindow::gap), masking the
    /// tokens between them; such decodes take the general kernels, and no page_bias.
    TokenWindow window;
    const int32_t* seq_lens = nullptr;  ///< [batch] on the device, or null: all are seq_len
    int seq_len = 0;
    int max_seq_len = 0;  ///< bound on every sequence length (plans the split)
    int batch = 0;
    int group = 0;                   ///< query heads per KV head, 1..8
    const float* queries = nullptr;  ///< [batch][num_kv_heads * group][head_dim]
    float* out = nullptr;            ///< [batch][num_kv_heads * group][head_dim]
    float scale = 1.0f;
    /// Centred keys (KeyCenter): [batch][num_kv_heads * group][page_bias_stride] floats added to
    /// the logits (log2 units) of every token of a page, or null. With it, the decode launches
    /// as the programmatic dependent of the stream's previous kernel, which must be the one
    /// that wrote page_bias (KeyCenter::page_bias): it reads nothing else that kernel writes.
    const float* page_bias = nullptr;
    int page_bias_stride = 0;
    void* workspace = nullptr;  ///< decode_workspace_bytes(args) bytes
    /// Lane copies of the 256-entry pair tables of 4-bit keys or values in shared memory: 0
    /// lets the plan choose (by residency; at 4-bit keys and values on sm_90, one shared table
    /// in rows mixed with the page rings), 1, 16 or 32 force contiguous copies (tests cover each).
    int table_copies = 0;
    /// Pages per warp in shared memory: 0 lets the plan choose, 1..4 force it (for comparisons;
    /// a depth that does not fit fails the launch).
    int ring = 0;
    /// Splits of each sequence's pages: 0 lets the plan choose, n > 0 forces min(n, pages) even
    /// ones (for comparisons).
    int splits = 0;
    /// With splits = 0, b > 0 forces floor(pages / b) splits of b pages, then splits of
    /// tail_pages (b where 0; at most the pages left) for the rest, the shape the plan takes at
    /// long contexts (for comparisons and tests). tail_pages without split_pages is refused.
    int split_pages = 0;
    int tail_pages = 0;
    /// L2 policy of the decode kernels' page copies: 0 lets the plan choose (evict-first: a
    /// model's weights pass through the L2 between two decodes of a layer, so its pages are never
    /// found there again), 1 the normal policy, 2 evict-first (for comparisons).
    int page_eviction = 0;
};

/// Whether the kernels take this layout (head_dim, bit widths, stages, alignment).
bool layout_supported(const TqPageLayout& layout);
/// Encodes with the bulk encoder specialized to the layout's key and value bits, or, for the
/// few tokens of a decode step, a latency-bound encoder over more lanes per token
/// (turboquant_encode_launch.cu).
cudaError_t launch_encode(const EncodeArgs& args, cudaStream_t stream);
cudaError_t launch_dequantize(const DequantizeArgs& args, cudaStream_t stream);
/// Split-K decode (each CTA takes a KV head and a page range of one sequence) and the merge
/// that combines the splits and applies the inverse value rotation.
cudaError_t launch_decode_attention(const DecodeArgs& args, cudaStream_t stream);
/// Workspace the decode needs for these arguments on the current device.
std::size_t decode_workspace_bytes(const DecodeArgs& args);
/// Splits of each sequence's pages that the decode plans for these arguments on the current
/// device (0: no plan), as benchmarks record.
int decode_splits(const DecodeArgs& args);
/// Whether the decode takes the mixed-row kernels on a device of compute capability major.x
/// (sm_90: 1-bit keys / 2-bit values, 4-bit keys and values of one codebook, two 2-bit key stages
/// for groups of up to 4; the fastest decodes). They take the block offsets of
/// PageLayout::finalize as constants, so a layout that moves a block falls back to the general
/// kernels: still correct, slower. Host only, no device call.
bool decode_takes_mixed_rows(const DecodeArgs& args, int major);
/// launch_decode_attention in `workspace` (bytes long), grown first (after synchronizing the
/// device) when the decode needs more; throws std::runtime_error naming a failed call.
void decode_in_workspace(DecodeArgs args, void*& workspace, std::size_t& bytes,
                         cudaStream_t stream);

/// Throws std::runtime_error naming the call when a CUDA call failed.
void check_cuda(cudaError_t err, const char* what);

/// Host-side codec parameters of a turboquant_rvq cache, identical to the CPU codecs'.
struct TqHostTables {
    TqPageLayout layout;
    PageLayout page_layout;  ///< the CPU page layout these offsets come from
    std::vector<float> key_signs, value_signs, key_centroids, key_boundaries;
    std::vector<float> value_centroids, value_boundaries, key_affine;
    std::vector<uint32_t> key_pairs, value_pairs, key_i8, key_i8_joint;
    float key_i8_joint_weight = 1.0f;
    float value_pair_scale = 1.0f;
    float key_c0_sum = 0.0f;
    float inv_sqrt_d = 0.0f;
};

/// Builds the tables of (config, num_kv_heads, head_dim, layer); throws std::invalid_argument
/// outside this backend's scope.
TqHostTables make_host_tables(const KVCacheConfig& config, int num_kv_heads, int head_dim,
                              int layer);

/// The device copy of TqHostTables (one allocation).
class DeviceTables {
public:
    explicit DeviceTables(const TqHostTables& host);
    ~DeviceTables();
    DeviceTables(const DeviceTables&) = delete;
    DeviceTables& operator=(const DeviceTables&) = delete;
    const TqDeviceTables& get() const { return tables_; }
    std::size_t nbytes() const { return bytes_; }

private:
    void* memory_ = nullptr;
    std::size_t bytes_ = 0;
    TqDeviceTables tables_;
};

/// One layer's turboquant_rvq cache of one sequence, resident on the device: a pool of pages in
/// the CPU page layout, grown by a quarter at a time up to max_seq_len, with an identity page
/// table. Layouts as KVCache: keys/values [num_heads][n][head_dim], queries/out
/// [num_q_heads][head_dim].
class CudaTurboQuantCache {
public:
    /// window > 0 makes a sliding window, as SlidingWindowKVCache(cache, window, sink_tokens):
    /// a decode attends the first sink_tokens positions and the last `window`, and the pages
    /// wholly between them are given back to a mapped pool as the cache grows
    /// (std::invalid_argument for a negative window or sinks, and with center_keys: CudaCodecCache
    /// serves those).
    CudaTurboQuantCache(const KVCacheConfig& config, int num_heads, int head_dim,
                        int max_seq_len = 8192, int layer = 0, int window = 0, int sink_tokens = 4);
    ~CudaTurboQuantCache();
    CudaTurboQuantCache(const CudaTurboQuantCache&) = delete;
    CudaTurboQuantCache& operator=(const CudaTurboQuantCache&) = delete;

    /// Encodes n_tokens device-resident tokens; throws std::length_error past max_seq_len and
    /// std::invalid_argument for NaN, Inf or values over fp16 storage's range (nothing
    /// changes; the check synchronizes the stream). With center_keys the first append
    /// estimates the keys' pre-RoPE mean (synchronizing again), as the CPU cache does. A sliding
    /// window then gives back the pages wholly inside [sinks, first new position + 1 - window),
    /// as SlidingWindowKVCache::append.
    void append(const float* keys, const float* values, int n_tokens, cudaStream_t stream);
    /// Decode attention of one query per query head over every stored token (a sliding
    /// window's: its sinks and window).
    void attend(const float* queries, int num_q_heads, float* out, float scale,
                cudaStream_t stream) const;
    /// Reconstructs tokens [start, start + n_tokens) into device buffers (std::out_of_range
    /// where a sliding window evicted some).
    void dequantize(int start, int n_tokens, float* keys, float* values, cudaStream_t stream) const;

    /// center_keys: the pre-RoPE key mean [num_heads][head_dim] (zeros until the first append).
    const KeyCenter& key_center() const { return center_; }
    /// center_keys: sets the key mean, e.g. the CPU cache's whose pages upload() takes
    /// (std::invalid_argument without center_keys, for a wrong size or non-finite entries).
    void set_key_mean(const std::vector<float>& mean) { center_.set_mean(mean); }

    /// Forgets every token (keeps the pool; later appends overwrite it).
    void reset();
    /// Keeps the first n_tokens tokens (0 <= n_tokens <= size()); each token's codes and
    /// scalars are rewritten whole by a later append, so nothing else needs clearing. A sliding
    /// window refuses (std::invalid_argument) where the new last token's window was evicted.
    void truncate(int n_tokens);

    /// The sliding window's width (0: none) and sink tokens.
    int window() const { return window_.window; }
    int sink_tokens() const { return window_.sinks; }
    /// Whether position pos is stored (not evicted by a sliding window).
    bool position_held(int pos) const;

    int size() const { return size_; }
    int max_seq_len() const { return max_seq_len_; }
    /// The device the pool lives on (the current device at construction).
    int device() const { return device_; }
    int num_heads() const { return num_heads_; }
    int head_dim() const { return head_dim_; }
    /// Device bytes held: the page pool, the codec tables, the decode workspace and, with
    /// center_keys, the key centre and page bias.
    std::size_t nbytes() const;
    const PageLayout& page_layout() const { return host_.page_layout; }
    const TqPageLayout& layout() const { return host_.layout; }
    const TqDeviceTables& tables() const { return tables_.get(); }

    /// Replaces the contents with the first `size` positions of a CPU store of the same layout
    /// (every page held); a centred cache keeps its key mean, and until one is set (set_key_mean)
    /// appends, attends and dequantizes refuse. Synchronous.
    void upload(const PagedStore& store, int size);
    /// Copies every page into a CPU store of the same layout (pages allocated as needed).
    /// Synchronous.
    void download(PagedStore& store) const;
    /// Copies page `page` (0 <= page < pages held) into page_bytes of host memory. Synchronous.
    void copy_page(int page, void* host) const;

    /// The CPU cache this one is: the factory's turboquant_rvq cache of the config holding these
    /// pages (a centred cache's key mean in its codecs). std::invalid_argument for a centred
    /// cache holding uploaded tokens without its mean. Synchronous.
    std::unique_ptr<QuantizedKVCache> to_host() const;
    /// to_host(), in a SlidingWindowKVCache of the same window and sinks where this cache has
    /// one. Synchronous.
    std::unique_ptr<KVCache> host_cache() const;
    /// A device cache (on the current device) holding a CPU cache's pages: a QuantizedKVCache of
    /// a config this cache takes, or a SlidingWindowKVCache around one (its window and sinks);
    /// a centred one's key mean where it was estimated. std::invalid_argument otherwise.
    /// Synchronous.
    static std::unique_ptr<CudaTurboQuantCache> from_host(const KVCache& cpu);
    /// Writes the cache file of host_cache() (versioned, checksummed, atomic).
    void save(const std::string& path) const;
    /// from_host of a cache file's cache; the file's errors as KVCache::load's, and
    /// std::invalid_argument for a cache this one cannot hold.
    static std::unique_ptr<CudaTurboQuantCache> load(const std::string& path);

private:
    friend class CudaTurboQuantBatch;  // appends and attends of many sequences at once

    /// Query heads per KV head of an attend (std::invalid_argument unless 1..8, or for a
    /// scale that is not finite).
    int query_group(int num_q_heads, float scale) const;
    /// Throws std::invalid_argument naming `what` for a centred cache that holds tokens but no
    /// key mean (pages uploaded without set_key_mean): its codes cannot be read or extended.
    void require_key_mean(const char* what) const;
    /// Encodes checked tokens at the end (the mean first, on a centred cache's first append).
    void encode_tokens(const float* keys, const float* values, int n_tokens, cudaStream_t stream);
    /// Pages for n_tokens more tokens: a larger pool, or a window's slots for the new pages.
    void make_room(int n_tokens, cudaStream_t stream);
    /// A sliding window after an append of the tokens from position `first_new` on: gives back
    /// the pages wholly inside [sinks, first_new + 1 - window). Nothing without a window.
    void evict_after_append(int first_new);

    /// Unique per cache object of the process (CudaTurboQuantBatch remembers the caches it has
    /// checked by it; an address can be reused by a later cache).
    const uint64_t serial_;
    KVCacheConfig config_;
    int layer_;
    TqHostTables host_;
    DeviceTables tables_;
    int num_heads_;
    int head_dim_;
    int max_seq_len_;
    float key_bound_;    ///< KVCacheConfig::key_bound: what append accepts
    float value_bound_;  ///< KVCacheConfig::value_bound
    int device_ = 0;
    int size_ = 0;
    TokenWindow window_;  ///< a sliding window (window_.window = 0: none)
    DevicePagePool pages_;
    InputCheck input_check_;
    KeyCenter center_;
    mutable void* workspace_ = nullptr;
    mutable std::size_t workspace_bytes_ = 0;
    mutable void* page_bias_ = nullptr;  ///< centred keys: a decode's page bias
    mutable std::size_t page_bias_bytes_ = 0;
};

}  // namespace veloxquant::cuda
