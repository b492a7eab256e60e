#include "cuda/page_pool.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/cuda_cache.h"

namespace veloxquant::cuda {

int grown_pool_pages(int needed, int capacity, int max_pages, std::size_t page_bytes) {
    const long long at_least =
        std::max<long long>({needed, capacity + (capacity + 3) / 4, std::min(16, max_pages)});
    const std::size_t bytes = static_cast<std::size_t>(at_least) * page_bytes;
    if (bytes <= kAllocationGranule / 2)  // taken as asked (in 32 KB steps, not whole granules)
        return static_cast<int>(std::min<long long>(max_pages, at_least));
    const std::size_t granules = (bytes + kAllocationGranule - 1) / kAllocationGranule;
    const long long filled = static_cast<long long>(granules * kAllocationGranule / page_bytes);
    return static_cast<int>(std::min<long long>(max_pages, std::max(at_least, filled)));
}

DevicePagePool::DevicePagePool(const PageLayout& layout, int max_tokens)
    : layout_(layout),
      max_pages_((max_tokens + layout.tokens_per_page - 1) / layout.tokens_per_page) {}

DevicePagePool::~DevicePagePool() {
    cudaFree(pool_);
    cudaFree(page_table_);
}

void DevicePagePool::reserve(int n_tokens) {
    const int needed = (n_tokens + layout_.tokens_per_page - 1) / layout_.tokens_per_page;
    if (needed <= capacity_pages_) return;
    const int pages = grown_pool_pages(needed, capacity_pages_, max_pages_, layout_.page_bytes);
    const std::size_t bytes = static_cast<std::size_t>(pages) * layout_.page_bytes;
    uint8_t* pool = nullptr;
    int32_t* table = nullptr;
    check_cuda(cudaMalloc(&pool, bytes), "cudaMalloc(page pool)");
    if (cudaMalloc(&table, pages * sizeof(int32_t)) != cudaSuccess) {
        cudaFree(pool);
        throw std::runtime_error("cudaMalloc(page table) failed");
    }
    std::vector<int32_t> identity(pages);
    for (int p = 0; p < pages; ++p) identity[p] = p;
    check_cuda(cudaDeviceSynchronize(), "reserve: synchronize");  // old pool no longer in use
    check_cuda(cudaMemset(pool, 0, bytes), "cudaMemset(page pool)");
    check_cuda(cudaMemcpy(table, identity.data(), pages * sizeof(int32_t), cudaMemcpyHostToDevice),
               "page table");
    if (pool_ != nullptr)
        check_cuda(
            cudaMemcpy(pool, pool_, static_cast<std::size_t>(capacity_pages_) * layout_.page_bytes,
                       cudaMemcpyDeviceToDevice),
            "grow page pool");
    cudaFree(pool_);
    cudaFree(page_table_);
    pool_ = pool;
    page_table_ = table;
    capacity_pages_ = pages;
}

std::size_t DevicePagePool::nbytes() const {
    return static_cast<std::size_t>(capacity_pages_) * (layout_.page_bytes + sizeof(int32_t));
}

void DevicePagePool::upload(const PagedStore& store, int size) {
    if (!same_layout(store.layout(), layout_))
        throw std::invalid_argument("upload: page layout differs");
    if (size < 0 || size > max_pages_ * layout_.tokens_per_page)
        throw std::invalid_argument("upload: bad size");
    const int pages = (size + layout_.tokens_per_page - 1) / layout_.tokens_per_page;
    for (int p = 0; p < pages; ++p)
        if (!store.held(p))
            throw std::invalid_argument("upload: page " + std::to_string(p) + " is not held");
    reserve(std::max(size, 1));
    check_cuda(cudaMemset(pool_, 0, static_cast<std::size_t>(capacity_pages_) * layout_.page_bytes),
               "upload");
    for (int p = 0; p < pages; ++p)
        check_cuda(cudaMemcpy(pool_ + static_cast<std::size_t>(p) * layout_.page_bytes,
                              store.page_data(p), layout_.page_bytes, cudaMemcpyHostToDevice),
                   "upload");
}

void DevicePagePool::download(PagedStore& store, int size) const {
    if (!same_layout(store.layout(), layout_))
        throw std::invalid_argument("download: page layout differs");
    store.reserve_tokens(size);
    check_cuda(cudaDeviceSynchronize(), "download: synchronize");
    for (int p = 0; p < (size + layout_.tokens_per_page - 1) / layout_.tokens_per_page; ++p) {
        uint8_t* dst = store.held(p) ? store.page_data(p) : store.allocate_page(p);
        check_cuda(cudaMemcpy(dst, pool_ + static_cast<std::size_t>(p) * layout_.page_bytes,
                              layout_.page_bytes, cudaMemcpyDeviceToHost),
                   "download");
    }
}

void DevicePagePool::copy_page(int page, void* host) const {
    if (page < 0 || page >= capacity_pages_ || host == nullptr)
        throw std::out_of_range("copy_page: page " + std::to_string(page) + " is outside [0, " +
                                std::to_string(capacity_pages_) + ")");
    check_cuda(cudaDeviceSynchronize(), "copy_page: synchronize");
    check_cuda(cudaMemcpy(host, pool_ + static_cast<std::size_t>(page) * layout_.page_bytes,
                          layout_.page_bytes, cudaMemcpyDeviceToHost),
               "copy_page");
}

}  // namespace veloxquant::cuda
