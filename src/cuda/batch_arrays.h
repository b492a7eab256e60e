// BatchArrays: the device arrays that let one launch read a batch of sequences, each from its
// own cache's page pool: pools [batch] (device pointers), lengths [batch], and an identity page
// table [batch][stride] (every device cache's own page table is the identity). The pointers
// and lengths change at every decode step; they go to the device by one asynchronous copy on
// the caller's stream from pinned memory, which is rewritten only after that copy is done, so
// a decode loop never waits on it. Shared by CudaTurboQuantBatch and CudaCodecBatch, with the
// checks both make of their caches.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace veloxquant::cuda {

/// What every batch call checks first: one distinct, non-null cache per sequence
/// (std::invalid_argument naming the call otherwise).
template <class P>
void check_distinct(const std::vector<P>& caches, const char* what) {
    if (caches.empty()) throw std::invalid_argument(std::string(what) + ": no caches");
    for (size_t b = 0; b < caches.size(); ++b) {
        if (caches[b] == nullptr)
            throw std::invalid_argument(std::string(what) + ": cache " + std::to_string(b) +
                                        " is null");
        for (size_t e = 0; e < b; ++e)
            if (caches[e] == caches[b])
                throw std::invalid_argument(std::string(what) + ": sequences " + std::to_string(e) +
                                            " and " + std::to_string(b) + " are the same cache");
    }
}

/// What every batch append checks before the input check: n_tokens >= 0, inputs present, and
/// room for n_tokens more in every cache (std::length_error naming the sequence).
template <class P>
void check_append(const std::vector<P>& caches, const float* keys, const float* values,
                  int n_tokens) {
    if (n_tokens < 0) throw std::invalid_argument("append: n_tokens must be >= 0");
    if (n_tokens > 0 && (keys == nullptr || values == nullptr))
        throw std::invalid_argument("append: null keys or values");
    for (size_t b = 0; b < caches.size(); ++b)
        if (static_cast<long long>(caches[b]->size()) + n_tokens > caches[b]->max_seq_len())
            throw std::length_error("append: " + std::to_string(n_tokens) +
                                    " tokens would take sequence " + std::to_string(b) +
                                    " past max_seq_len " +
                                    std::to_string(caches[b]->max_seq_len()));
}

/// Each cache's damped key mean (KeyCenter::damped; zeros where a center_keys cache does not
/// centre) as the "pools" of a BatchArrays: the array of mean pointers that a batch's centred
/// launches read, sequence b's at b.
template <class P>
std::vector<const uint8_t*> damped_means(const std::vector<P>& caches) {
    std::vector<const uint8_t*> damped;
    for (const auto* c : caches)
        damped.push_back(reinterpret_cast<const uint8_t*>(c->key_center().damped()));
    return damped;
}

class BatchArrays {
public:
    BatchArrays() = default;
    ~BatchArrays();
    BatchArrays(const BatchArrays&) = delete;
    BatchArrays& operator=(const BatchArrays&) = delete;

    /// Makes the arrays hold these pools and lengths (one entry per sequence) with a table of
    /// at least `pages` pages per row. Growing the arrays synchronizes the device (rare: a
    /// larger batch or pool).
    void describe(const std::vector<const uint8_t*>& pools, const std::vector<int32_t>& lens,
                  int pages, cudaStream_t stream);

    const uint8_t* const* pools() const { return static_cast<const uint8_t* const*>(device_); }
    const int32_t* lens() const;
    const int32_t* page_table() const;  ///< [rows][stride()], row b = 0, 1, 2, ...
    int stride() const { return stride_; }
    std::size_t nbytes() const { return bytes_; }

private:
    void* device_ = nullptr;  ///< pools [rows_], lengths [rows_], then the table
    std::size_t bytes_ = 0;
    int rows_ = 0;                       ///< sequences the arrays are laid out for
    int stride_ = 0;                     ///< pages per row of the table
    void* staged_ = nullptr;             ///< pinned host copy of the pools and lengths
    cudaEvent_t staged_done_ = nullptr;  ///< recorded after the last copy out of staged_
};

}  // namespace veloxquant::cuda
