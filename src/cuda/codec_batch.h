// CudaCodecBatch: the decode steps of a batch of sequences on the generic path, one
// CudaCodecCache per sequence (one layer's caches, of one config). One call appends every
// sequence's new tokens after one input check and one synchronization, with one encode launch
// (centred keys: one more first, which shifts each sequence's keys by its own mean), and one call
// attends over every sequence with one query-state, one attention and one merge launch (each
// sequence read from and written to its own cache's pool), where the caches alone take one of each
// per sequence. Caches whose codecs learned from their own sequence (rabitq's centroids, trained on
// each prefill) batch too: the launches then read each sequence's codecs through a small device
// array of their parameters (codec_params_view.h). The caches keep their tokens; this object holds
// only the device arrays that describe the batch.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <vector>

#include "cuda/batch_arrays.h"
#include "cuda/codec_cache.h"
#include "cuda/input_check.h"

namespace veloxquant::cuda {

class CudaCodecBatch {
public:
    CudaCodecBatch() = default;
    ~CudaCodecBatch();
    CudaCodecBatch(const CudaCodecBatch&) = delete;
    CudaCodecBatch& operator=(const CudaCodecBatch&) = delete;

    /// Whether these caches can attend in one launch: one distinct cache per sequence, of one
    /// config, layer and shape (caches made by one another's empty_like, say), on one device,
    /// every codec ready (trained, where it trains), of one sliding window (or none), none with
    /// an outlier side store (those append and attend one by one). What the codecs learned may
    /// differ.
    static bool alike(const std::vector<const CudaCodecCache*>& caches);

    /// Encodes n_tokens tokens into each cache: keys and values [batch][num_heads][n_tokens]
    /// [head_dim] on the device, sequence b's for caches[b]. All or nothing: before any cache
    /// changes it throws std::invalid_argument for caches that are not one distinct cache per
    /// sequence of one config, layer, shape and device without an outlier side store, and for NaN,
    /// Inf or values over fp16 storage's range (naming the sequence), and std::length_error when a
    /// cache would pass its max_seq_len; a training or encode that throws later leaves every
    /// cache's size as it was and the caches it trained untrained. Synchronizes the stream once (a
    /// codec that trains, on its first append, trains as the cache alone does).
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
               kin_capacity_ * sizeof(CodecParamsView);
    }

private:
    /// append's encode of every sequence's n_tokens (keys and values per_sequence floats
    /// apart), in one launch where the caches are alike; advances their sizes.
    void encode(const std::vector<CudaCodecCache*>& caches, const float* keys, const float* values,
                int n_tokens, size_t per_sequence, cudaStream_t stream);
    /// Each sequence's codecs for a launch over alike caches: none (the views null) where they
    /// all share caches[0]'s, else one view per sequence, uploaded when they change.
    KinParams kin_params(const std::vector<CudaCodecCache*>& caches, cudaStream_t stream);

    InputCheck input_check_;
    BatchArrays encode_arrays_;  ///< the appends' pools and first positions
    BatchArrays arrays_;         ///< the attends' pools and sizes
    /// Centred keys: each sequence's damped key mean (as its "pool") and its first position (an
    /// append's) or size (an attend's).
    BatchArrays centres_;
    BatchArrays tables_;  ///< a batch of sliding windows: each sequence's page table
    CodecParamsView* kin_views_ = nullptr;  ///< device [kin_capacity_]
    std::size_t kin_capacity_ = 0;
    std::vector<CodecParamsView> kin_uploaded_;  ///< what kin_views_ holds
};

}  // namespace veloxquant::cuda
