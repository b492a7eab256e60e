// CudaCodecBatch: the decode steps of a batch of sequences on the generic path, one
// CudaCodecCache per sequence (one layer's caches, of one config). One call appends every
// sequence's new tokens after one input check and one synchronization, with one encode launch,
// and one call attends over every sequence with one query-state, one attention and one merge
// launch (each sequence read from and written to its own cache's pool), where the caches alone
// take one of each per sequence. (The generic encoders run one thread per head and token, so a
// decode step's encode is bound by one thread's latency: one launch for the batch takes about
// as long as one for a sequence.) The caches keep their tokens; this object holds only the
// device arrays that describe the batch.
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
    /// Whether these caches can attend in one launch: one distinct cache per sequence, all
    /// with codecs (trained, where they train) equal to caches[0]'s and on its device. A codec
    /// trained on each sequence's own tokens (rabitq without calibrated centroids) is not.
    static bool alike(const std::vector<const CudaCodecCache*>& caches);

    /// Encodes n_tokens tokens into each cache: keys and values [batch][num_heads][n_tokens]
    /// [head_dim] on the device, sequence b's for caches[b]. All or nothing: before any cache
    /// changes it throws std::invalid_argument for caches that are not one distinct cache per
    /// sequence of one config, layer, shape and device, and for NaN, Inf or values over fp16
    /// storage's range (naming the sequence), and std::length_error when a cache would pass
    /// its max_seq_len. Synchronizes the stream once (a codec that trains, on its first
    /// append, trains as the cache alone does).
    void append(const std::vector<CudaCodecCache*>& caches, const float* keys, const float* values,
                int n_tokens, cudaStream_t stream);

    /// Decode attention of one query per query head for every sequence, in one launch of
    /// each kernel: queries and out [batch][num_q_heads][head_dim] on the device. The caches
    /// must be alike() and each hold a token (std::invalid_argument otherwise).
    void attend(const std::vector<CudaCodecCache*>& caches, const float* queries, int num_q_heads,
                float* out, float scale, cudaStream_t stream);

    /// Device bytes held: the batch's arrays (the workspace is caches[0]'s backend's).
    std::size_t nbytes() const { return encode_arrays_.nbytes() + arrays_.nbytes(); }

private:
    InputCheck input_check_;
    BatchArrays encode_arrays_;  ///< the appends' pools and first positions
    BatchArrays arrays_;         ///< the attends' pools and sizes
};

}  // namespace veloxquant::cuda
