// CudaTurboQuantBatch: the decode steps of a batch of sequences whose caches (one
// CudaTurboQuantCache per sequence, of one layer) share a config. One call appends every
// sequence's new tokens after one input check and one synchronization of the stream, with one
// encode launch (a decode step's; EncodeArgs::pools), and one split-K decode launch attends over
// every sequence, each read from its own page pool (DecodeArgs::pools), where the caches alone
// take one check, one synchronization, one encode and one decode per sequence. The caches stay
// the owners of their tokens; this object holds only the device arrays that describe the batch
// (pool pointers, lengths, page table) and the decode's workspace.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "cuda/batch_arrays.h"
#include "cuda/cuda_cache.h"
#include "cuda/input_check.h"

namespace veloxquant::cuda {

class CudaTurboQuantBatch {
public:
    CudaTurboQuantBatch() = default;
    ~CudaTurboQuantBatch();
    CudaTurboQuantBatch(const CudaTurboQuantBatch&) = delete;
    CudaTurboQuantBatch& operator=(const CudaTurboQuantBatch&) = delete;

    /// Encodes n_tokens tokens into each cache: keys and values [batch][num_heads][n_tokens]
    /// [head_dim] on the device, sequence b's for caches[b]. All or nothing: before any cache
    /// changes it throws std::invalid_argument for caches that are not one distinct cache per
    /// sequence of one codec, shape and device, and for NaN, Inf or values over fp16 storage's
    /// range (naming the sequence), and std::length_error when a cache would pass its
    /// max_seq_len. Synchronizes the stream once (the input check).
    void append(const std::vector<CudaTurboQuantCache*>& caches, const float* keys,
                const float* values, int n_tokens, cudaStream_t stream);

    /// Decode attention of one query per query head for every sequence, in one launch:
    /// queries and out [batch][num_q_heads][head_dim] on the device. Every cache must hold a
    /// token (std::invalid_argument otherwise, as for mismatched caches).
    void attend(const std::vector<const CudaTurboQuantCache*>& caches, const float* queries,
                int num_q_heads, float* out, float scale, cudaStream_t stream);

    /// Device bytes held: the batch's arrays, the decode workspace and page bias.
    std::size_t nbytes() const {
        return encode_arrays_.nbytes() + arrays_.nbytes() + centres_.nbytes() + tables_.nbytes() +
               workspace_bytes_ + page_bias_bytes_;
    }

private:
    /// Throws std::invalid_argument unless `caches` is one distinct cache per sequence, all
    /// of caches[0]'s codec, shape and device. The caches of the last batch that passed are
    /// remembered by serial: a decode loop compares each step's caches' tables only once.
    void check_batch(const std::vector<const CudaTurboQuantCache*>& caches, const char* what);
    /// Encodes every sequence's new tokens into its own cache's pool from its size: a decode
    /// step's (under kShortAppendTokens) in one launch, a prefill's a launch a sequence; centred
    /// keys are shifted first, all in one launch. Changes no size.
    void encode(const std::vector<CudaTurboQuantCache*>& caches, const float* keys,
                const float* values, int n_tokens, cudaStream_t stream);

    std::vector<uint64_t> checked_;  ///< serials of the last caches that passed check_batch
    InputCheck input_check_;
    BatchArrays encode_arrays_;  ///< the appends' pools and first positions
    BatchArrays arrays_;         ///< the attends' pools and lengths
    /// Centred keys: each sequence's damped key mean (KeyCenter::damped), as the pool pointers
    /// of another BatchArrays (an array of device pointers, uploaded the same way), with its
    /// first position (an append's) or length (an attend's).
    BatchArrays centres_;
    BatchArrays tables_;  ///< a batch of sliding windows: each sequence's page table
    void* workspace_ = nullptr;
    std::size_t workspace_bytes_ = 0;
    void* page_bias_ = nullptr;
    std::size_t page_bias_bytes_ = 0;
};

}  // namespace veloxquant::cuda
