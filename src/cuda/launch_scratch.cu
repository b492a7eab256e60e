#include "cuda/launch_scratch.h"

#include <stdexcept>
#include <string>

#include "cuda/cuda_cache.h"

namespace veloxquant::cuda {

void ensure_device_bytes(void*& buffer, std::size_t& bytes, std::size_t need, const char* what) {
    if (need <= bytes) return;
    check_cuda(cudaDeviceSynchronize(), what);  // no launch still reads the old buffer
    cudaFree(buffer);
    buffer = nullptr;
    bytes = 0;
    check_cuda(cudaMalloc(&buffer, need), what);
    bytes = need;
}

LaunchScratch::~LaunchScratch() {
    cudaFree(kept_);
    if (transient_ != nullptr) cudaFree(transient_);
}

void* LaunchScratch::get(std::size_t bytes, cudaStream_t stream, const char* what) {
    if (transient_ != nullptr)
        throw std::logic_error(std::string(what) + ": scratch taken twice without a release");
    if (bytes > kKeptBytes) {
        void* buffer = nullptr;
        check_cuda(cudaMallocAsync(&buffer, bytes, stream), what);
        return transient_ = buffer;
    }
    ensure_device_bytes(kept_, kept_bytes_, bytes, what);
    return kept_;
}

void LaunchScratch::release(cudaStream_t stream) noexcept {
    if (transient_ == nullptr) return;
    cudaFreeAsync(transient_, stream);
    transient_ = nullptr;
}

}  // namespace veloxquant::cuda
