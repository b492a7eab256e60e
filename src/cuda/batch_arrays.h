// BatchArrays: the device arrays that let one launch read a batch of sequences, each from its
// own cache's page pool: pools [batch] (device pointers), lengths [batch], and an identity page
// table [batch][stride] (every device cache's own page table is the identity). The pointers
// and lengths change at every decode step; they go to the device by one asynchronous copy on
// the caller's stream from pinned memory, which is rewritten only after that copy is done, so
// a decode loop never waits on it. Shared by CudaTurboQuantBatch and CudaCodecBatch.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace veloxquant::cuda {

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
