// CudaCodecBatch: the decode steps of a batch of sequences on the generic path, one
// CudaCodecCache per sequence (one layer's caches, of one config). One call appends every
// sequence's new tokens after one input check and one synchronization, with one encode launch
// (centred keys: one more first, which shifts each sequence's keys by its own mean), and one call
// attends over every sequence with one query-state, one attention and one merge launch (each
// sequence read from and written to its own cache's pool), where the caches alone take one of each
// per sequence. Caches whose codecs learned from their own sequence (rabitq's centroids, trained on
// each prefill) batch too: the launches then read each sequence's codecs through a small device
// array of their parameters (codec_params_view.h). So do caches with an outlier side store: the
// observer sees each sequence's norms in sequence order, as appends one by one would show them,
// and the launches read each sequence's side store through a device array of their views. The
// caches keep their tokens; this object holds only the device arrays that describe the batch.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <vector>

#include "cuda/batch_arrays.h"
#include "cuda/codec_cache.h"
#include "cuda/cuda_cache.h"
#include "cuda/input_check.h"

namespace veloxquant::cuda {

/// A device copy of one small item per sequence or unit (its codecs' parameters, its outlier side
/// store's view), uploaded only when the host's differ (`same` compares two) from pageable
/// memory: the copy is staged before the call returns and runs after the stream's earlier
/// launches, which may read what it replaces. Growing it synchronizes the device first.
template <class T>
class SequenceViews {
public:
    SequenceViews() = default;
    ~SequenceViews() {
        if (device_ == nullptr) return;
        cudaDeviceSynchronize();  // no launch reads them any more
        cudaFree(device_);
    }
    SequenceViews(const SequenceViews&) = delete;
    SequenceViews& operator=(const SequenceViews&) = delete;

    template <class Same>
    const T* update(const std::vector<T>& views, Same same, cudaStream_t stream, const char* what) {
        if (std::equal(views.begin(), views.end(), uploaded_.begin(), uploaded_.end(), same))
            return device_;
        const std::size_t bytes = views.size() * sizeof(T);
        if (views.size() > capacity_) {
            check_cuda(cudaDeviceSynchronize(), what);
            cudaFree(device_);
            device_ = nullptr, capacity_ = 0;
            uploaded_.clear();
            check_cuda(cudaMalloc(reinterpret_cast<void**>(&device_), bytes), what);
            capacity_ = views.size();
        }
        check_cuda(cudaMemcpyAsync(device_, views.data(), bytes, cudaMemcpyHostToDevice, stream),
                   what);
        uploaded_ = views;
        return device_;
    }
    std::size_t nbytes() const { return capacity_ * sizeof(T); }

private:
    T* device_ = nullptr;
    std::size_t capacity_ = 0;
    std::vector<T> uploaded_;  ///< what device_ holds
};

class CudaCodecBatch {
public:
    CudaCodecBatch() = default;
    CudaCodecBatch(const CudaCodecBatch&) = delete;
    CudaCodecBatch& operator=(const CudaCodecBatch&) = delete;

    /// Whether these caches can attend in one launch: one distinct cache per sequence, of one
    /// config, layer and shape (caches made by one another's empty_like, say), on one device,
    /// every codec ready (trained, where it trains), of one sliding window (or none). What the
    /// codecs learned, and the entries of their outlier side stores, may differ.
    static bool alike(const std::vector<const CudaCodecCache*>& caches);

    /// Encodes n_tokens tokens into each cache: keys and values [batch][num_heads][n_tokens]
    /// [head_dim] on the device, sequence b's for caches[b]. All or nothing: before any cache
    /// changes it throws std::invalid_argument for caches that are not one distinct cache per
    /// sequence of one config, layer, shape and device, and for NaN, Inf or values over fp16
    /// storage's range (naming the sequence), and std::length_error when a cache would pass its
    /// max_seq_len; a training, encode or outlier record that throws later leaves every cache's
    /// size, side store and observer statistics as they were and the caches it trained
    /// untrained. Synchronizes the stream once (a codec that trains, on its first append, ends
    /// trained as the cache alone would be, the uncentred rabitq caches' k-means in one call; a
    /// cache whose observer flags a token gathers it to the host, as alone).
    void append(const std::vector<CudaCodecCache*>& caches, const float* keys, const float* values,
                int n_tokens, cudaStream_t stream);

    /// Decode attention of one query per query head for every sequence, in one launch of
    /// each kernel: queries and out [batch][num_q_heads][head_dim] on the device. The caches
    /// must be alike() and each hold a token (std::invalid_argument otherwise).
    void attend(const std::vector<CudaCodecCache*>& caches, const float* queries, int num_q_heads,
                float* out, float scale, cudaStream_t stream);

    /// Device bytes held: the batch's arrays (the workspace is caches[0]'s backend's).
    std::size_t nbytes() const {
        return encode_arrays_.nbytes() + arrays_.nbytes() + centres_.nbytes() + tables_.nbytes() +
               kin_views_.nbytes() + side_views_.nbytes() + mask_rows_.nbytes();
    }

private:
    /// append's training of the caches that have not trained: in one device k-means where they
    /// are two or more uncentred rabitq caches (train_rabitq_on_device over all their heads, so
    /// a batch's first prefill pays the k-means' launches once), else each as it trains alone.
    static void train(const std::vector<CudaCodecCache*>& fresh,
                      const std::vector<const float*>& keys, int n_tokens, cudaStream_t stream);
    /// append's encode of every sequence's n_tokens (keys and values per_sequence floats
    /// apart), in one launch where the caches are alike; advances their sizes.
    void encode(const std::vector<CudaCodecCache*>& caches, const float* keys, const float* values,
                int n_tokens, size_t per_sequence, cudaStream_t stream);
    /// Each sequence's codecs for a launch over alike caches: none (the views null) where they
    /// all share caches[0]'s, else one view per sequence, uploaded when they change.
    KinParams kin_params(const std::vector<CudaCodecCache*>& caches, cudaStream_t stream);
    /// Each sequence's outlier side store for an attend (a view whose `sequences` are theirs,
    /// uploaded when they change), or none where no cache holds an entry.
    OutlierView side_params(const std::vector<CudaCodecCache*>& caches, cudaStream_t stream);

    InputCheck input_check_;
    BatchArrays encode_arrays_;  ///< the appends' pools and first positions
    BatchArrays arrays_;         ///< the attends' pools and sizes
    /// Centred keys: each sequence's damped key mean (as its "pool") and its first position (an
    /// append's) or size (an attend's).
    BatchArrays centres_;
    BatchArrays tables_;  ///< a batch of sliding windows: each sequence's page table
    SequenceViews<CodecParamsView> kin_views_;  ///< each sequence's codecs, where they differ
    SequenceViews<OutlierView> side_views_;     ///< each sequence's outlier side store
    SequenceViews<const uint32_t*> mask_rows_;  ///< and each unit's row of its mask
};

}  // namespace veloxquant::cuda
