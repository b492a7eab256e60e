// DeviceOutlierStore: CudaCodecCache's outlier side store (config.outlier_observer). Tokens whose
// key norm the KeyNormObserver flags keep their codes in the pages, and also their key and value
// at outlier_bits (int8 with an absmax scale, or fp16) here; the attention skips them in the pages
// and scores them exactly from these records, in the same softmax (OutlierView).
//
// The host holds the record of truth: the CPU's OutlierStore, filled by the CPU's own encoder
// from the flagged tokens (the few a chunk has, gathered from the device), so that its bytes are
// a CPU cache's and to_host, save and load move them as they are. The device holds a mirror that
// the kernels read: each head's records and positions in arrays of `capacity` entries, the
// counts, and a bit mask over the positions.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "cache/outlier_store.h"
#include "cuda/codec_params_view.h"

namespace veloxquant {
class KeyNormObserver;
}

namespace veloxquant::cuda {

class DeviceOutlierStore {
public:
    /// bits 8 or 16 (std::invalid_argument otherwise); max_tokens bounds the positions.
    DeviceOutlierStore(int num_heads, int head_dim, int bits, int max_tokens);
    ~DeviceOutlierStore();
    DeviceOutlierStore(const DeviceOutlierStore&) = delete;
    DeviceOutlierStore& operator=(const DeviceOutlierStore&) = delete;

    /// Queues the norms of n device keys [heads][n][d] (computed as key_norm does) and their
    /// copy to the host on `stream`; the caller synchronizes it (an append's input check does)
    /// before add().
    void measure(const float* keys, int n, cudaStream_t stream);
    /// Lets the observer see the measured norms in token order, as QuantizedKVCache::append does,
    /// and keeps the tokens it flags: keys and values [heads][n][d] at positions first.. (a
    /// flagged token's vectors come to the host, synchronizing the stream). On a throw the
    /// observer may have seen the norms (the caller restores its statistics) and entries at
    /// first.. may be kept (truncate(first) drops them).
    void add(KeyNormObserver& observer, int layer, const float* keys, const float* values, int n,
             int first, cudaStream_t stream);
    /// Drops the entries at positions >= n_tokens (clear: every one). Synchronizes the device
    /// first: kernels on any stream may read them.
    void truncate(int n_tokens);
    void clear();
    /// Drops the entries at positions in [begin, end) (a sliding window's eviction; the mirror
    /// changes on `stream`, after the kernels queued there).
    void erase_range(int begin, int end, cudaStream_t stream);
    /// Takes a CPU store's entries (of this store's bits and shape, positions below max_tokens;
    /// std::invalid_argument otherwise). Synchronous.
    void assign(const OutlierStore& entries);

    const OutlierStore& host() const { return host_; }
    int total() const { return host_.total(); }
    /// What the attention reads (records null while no entry is held).
    OutlierView view() const;
    /// Replaces the tokens of positions [start, start + n) this store holds in dequantized device
    /// keys and values [heads][n][d] with their records' vectors (QuantizedKVCache::dequantize).
    void restore(int start, int n, float* keys, float* values, cudaStream_t stream) const;
    /// Device bytes of the mirror.
    std::size_t nbytes() const;

private:
    /// Uploads head h's entries [from, count) and every head's count; grows the arrays (and
    /// uploads every entry) where a head holds more than the capacity.
    void upload_entries(int head, int from, cudaStream_t stream);
    void upload_counts(cudaStream_t stream);
    /// Sets the mask bits of the entries held (clearing the others) in words [w0, w1) of every
    /// head, and uploads those words.
    void upload_mask(int w0, int w1, cudaStream_t stream);
    void grow(int capacity, cudaStream_t stream);

    int num_heads_, head_dim_, max_tokens_, mask_words_;
    OutlierStore host_;
    std::size_t record_bytes_;  ///< one entry: key and value vectors
    int capacity_ = 0;
    uint8_t* records_ = nullptr;    ///< device [heads][capacity][record_bytes_]
    int32_t* positions_ = nullptr;  ///< device [heads][capacity]
    int32_t* counts_ = nullptr;     ///< device [heads]
    uint32_t* mask_ = nullptr;      ///< device [heads][mask_words_], made with the first entry
    std::vector<uint32_t> mask_host_;
    float* norms_ = nullptr;       ///< device [heads][n] of the last measure
    float* norms_host_ = nullptr;  ///< pinned, its copy
    std::size_t norms_capacity_ = 0;
    int measured_ = -1;  ///< the n of the last measure (-1: none since the last add)
};

}  // namespace veloxquant::cuda
