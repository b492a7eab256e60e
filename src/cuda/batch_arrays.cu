#include "cuda/batch_arrays.h"

#include <algorithm>

#include "cuda/cuda_cache.h"

namespace veloxquant::cuda {
namespace {

// Pools [rows] at 0, lengths [rows] after them, then the page table at a 16-byte boundary.
size_t lens_offset(int rows) {
    return static_cast<size_t>(rows) * sizeof(const uint8_t*);
}
size_t table_offset(int rows) {
    return (lens_offset(rows) + static_cast<size_t>(rows) * sizeof(int32_t) + 15) / 16 * 16;
}

}  // namespace

BatchArrays::~BatchArrays() {
    if (staged_done_ != nullptr) {
        cudaEventSynchronize(staged_done_);
        cudaEventDestroy(staged_done_);
    }
    cudaFreeHost(staged_);
    cudaFree(device_);
}

const int32_t* BatchArrays::lens() const {
    return reinterpret_cast<const int32_t*>(static_cast<const uint8_t*>(device_) +
                                            lens_offset(rows_));
}

const int32_t* BatchArrays::page_table() const {
    return reinterpret_cast<const int32_t*>(static_cast<const uint8_t*>(device_) +
                                            table_offset(rows_));
}

void BatchArrays::describe(const std::vector<const uint8_t*>& pools,
                           const std::vector<int32_t>& lens, int pages, cudaStream_t stream) {
    const int batch = static_cast<int>(pools.size());
    pages = std::max(pages, 1);
    if (batch > rows_ || pages > stride_) {
        const int rows = std::max(batch, rows_), width = std::max(pages, stride_);
        const size_t bytes =
            table_offset(rows) + static_cast<size_t>(rows) * width * sizeof(int32_t);
        check_cuda(cudaDeviceSynchronize(), "batch arrays: synchronize");  // no launch reads them
        cudaFree(device_);
        device_ = nullptr, bytes_ = 0, rows_ = 0, stride_ = 0;
        check_cuda(cudaMalloc(&device_, bytes), "cudaMalloc(batch arrays)");
        bytes_ = bytes;
        std::vector<int32_t> identity(static_cast<size_t>(rows) * width);
        for (size_t i = 0; i < identity.size(); ++i) identity[i] = static_cast<int32_t>(i % width);
        check_cuda(cudaMemcpy(static_cast<uint8_t*>(device_) + table_offset(rows), identity.data(),
                              identity.size() * sizeof(int32_t), cudaMemcpyHostToDevice),
                   "batch page table");
        if (staged_done_ == nullptr)
            check_cuda(cudaEventCreateWithFlags(&staged_done_, cudaEventDisableTiming), "event");
        cudaFreeHost(staged_);
        staged_ = nullptr;
        check_cuda(cudaMallocHost(&staged_, table_offset(rows)), "cudaMallocHost(batch arrays)");
        rows_ = rows, stride_ = width;
    }
    // The last copy out of the pinned buffer is done before it is rewritten (in a decode loop
    // the stream ran it long before).
    check_cuda(cudaEventSynchronize(staged_done_), "batch arrays: staged copy");
    auto* staged_pools = static_cast<const uint8_t**>(staged_);
    auto* staged_lens =
        reinterpret_cast<int32_t*>(static_cast<uint8_t*>(staged_) + lens_offset(rows_));
    std::copy(pools.begin(), pools.end(), staged_pools);
    std::copy(lens.begin(), lens.end(), staged_lens);
    check_cuda(
        cudaMemcpyAsync(device_, staged_, table_offset(rows_), cudaMemcpyHostToDevice, stream),
        "batch arrays");
    check_cuda(cudaEventRecord(staged_done_, stream), "batch arrays: event");
}

}  // namespace veloxquant::cuda
