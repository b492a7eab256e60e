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
    if (mapped_) throw std::logic_error("DevicePagePool::reserve: a mapped pool holds pages");
    const int needed = (n_tokens + layout_.tokens_per_page - 1) / layout_.tokens_per_page;
    if (needed <= capacity_pages_) return;
    grow(grown_pool_pages(needed, capacity_pages_, max_pages_, layout_.page_bytes));
}

void DevicePagePool::grow(int pages) {
    const std::size_t bytes = static_cast<std::size_t>(pages) * layout_.page_bytes;
    uint8_t* pool = nullptr;
    int32_t* table = nullptr;
    check_cuda(cudaMalloc(&pool, bytes), "cudaMalloc(page pool)");
    if (!mapped_ && cudaMalloc(&table, pages * sizeof(int32_t)) != cudaSuccess) {
        cudaFree(pool);
        throw std::runtime_error("cudaMalloc(page table) failed");
    }
    check_cuda(cudaDeviceSynchronize(), "grow page pool: synchronize");  // old pool not in use
    check_cuda(cudaMemset(pool, 0, bytes), "cudaMemset(page pool)");
    if (!mapped_) {
        std::vector<int32_t> identity(pages);
        for (int p = 0; p < pages; ++p) identity[p] = p;
        check_cuda(
            cudaMemcpy(table, identity.data(), pages * sizeof(int32_t), cudaMemcpyHostToDevice),
            "page table");
    }
    if (pool_ != nullptr)
        check_cuda(
            cudaMemcpy(pool, pool_, static_cast<std::size_t>(capacity_pages_) * layout_.page_bytes,
                       cudaMemcpyDeviceToDevice),
            "grow page pool");
    cudaFree(pool_);
    pool_ = pool;
    if (!mapped_) {
        cudaFree(page_table_);
        page_table_ = table;
    }
    for (int slot = pages - 1; mapped_ && slot >= capacity_pages_; --slot)
        free_slots_.push_back(slot);  // handed out lowest first
    capacity_pages_ = pages;
}

void DevicePagePool::map_pages() {
    if (mapped_) return;
    int32_t* table = nullptr;
    check_cuda(cudaMalloc(&table, static_cast<std::size_t>(max_pages_) * sizeof(int32_t)),
               "cudaMalloc(page table)");
    check_cuda(cudaMemset(table, 0, static_cast<std::size_t>(max_pages_) * sizeof(int32_t)),
               "page table");
    cudaFree(page_table_);
    page_table_ = table;
    mapped_ = true;
    slot_of_.assign(max_pages_, -1);
    free_slots_.clear();
    for (int slot = capacity_pages_ - 1; slot >= 0; --slot) free_slots_.push_back(slot);
}

void DevicePagePool::hold(int first, int end, cudaStream_t stream) {
    if (!mapped_) throw std::logic_error("DevicePagePool::hold: an identity pool");
    if (first < 0 || end > max_pages_ || first > end)
        throw std::out_of_range("hold: pages [" + std::to_string(first) + ", " +
                                std::to_string(end) + ") are outside [0, " +
                                std::to_string(max_pages_) + ")");
    int missing = 0;
    for (int p = first; p < end; ++p) missing += slot_of_[p] < 0 ? 1 : 0;
    if (missing == 0) return;
    if (missing > static_cast<int>(free_slots_.size())) {
        const int needed = capacity_pages_ - static_cast<int>(free_slots_.size()) + missing;
        grow(grown_pool_pages(needed, capacity_pages_, max_pages_, layout_.page_bytes));
    }
    for (int p = first; p < end; ++p) {
        if (slot_of_[p] >= 0) continue;
        slot_of_[p] = free_slots_.back();
        free_slots_.pop_back();
    }
    // Pageable source: staged before the call returns, ordered on the stream.
    check_cuda(cudaMemcpyAsync(page_table_ + first, slot_of_.data() + first,
                               static_cast<std::size_t>(end - first) * sizeof(int32_t),
                               cudaMemcpyHostToDevice, stream),
               "page table entries");
}

void DevicePagePool::release(int first, int end) {
    if (!mapped_) throw std::logic_error("DevicePagePool::release: an identity pool");
    for (int p = std::max(first, 0); p < std::min(end, max_pages_); ++p) {
        if (slot_of_[p] < 0) continue;
        free_slots_.push_back(slot_of_[p]);
        slot_of_[p] = -1;
    }
}

bool DevicePagePool::held(int page) const {
    if (page < 0) return false;
    return mapped_ ? page < max_pages_ && slot_of_[page] >= 0 : page < capacity_pages_;
}

void DevicePagePool::require_held(int start, int n) const {
    const int P = layout_.tokens_per_page;
    for (int p = start / P; p <= (start + n - 1) / P; ++p)
        if (!held(p))
            throw std::out_of_range("dequantize: tokens of page " + std::to_string(p) +
                                    " were evicted by the sliding window");
}

void DevicePagePool::cut_window(int n, int size, int window, int sinks) {
    const int P = layout_.tokens_per_page, from = n - window;
    if (n > 0 && from > sinks && !held(from / P))
        throw std::invalid_argument("truncate: keeping " + std::to_string(n) +
                                    " tokens would expose positions the sliding window evicted");
    release((n + P - 1) / P, (size + P - 1) / P);
}

uint8_t* DevicePagePool::slot_data(int page) const {
    const int slot = mapped_ ? slot_of_[page] : page;
    return pool_ + static_cast<std::size_t>(slot) * layout_.page_bytes;
}

std::size_t DevicePagePool::nbytes() const {
    const std::size_t table = static_cast<std::size_t>(mapped_ ? max_pages_ : capacity_pages_);
    return static_cast<std::size_t>(capacity_pages_) * layout_.page_bytes + table * sizeof(int32_t);
}

void DevicePagePool::upload(const PagedStore& store, int size) {
    if (!same_layout(store.layout(), layout_))
        throw std::invalid_argument("upload: page layout differs");
    if (size < 0 || size > max_pages_ * layout_.tokens_per_page)
        throw std::invalid_argument("upload: bad size");
    const int pages = (size + layout_.tokens_per_page - 1) / layout_.tokens_per_page;
    for (int p = 0; p < pages; ++p)
        if (!store.held(p) && !(mapped_ && p + 1 < pages))  // a window keeps its last page
            throw std::invalid_argument("upload: page " + std::to_string(p) + " is not held");
    if (mapped_) {
        release(0, max_pages_);
        for (int p = 0; p < pages; ++p)
            if (store.held(p)) hold(p, p + 1, nullptr);
        check_cuda(cudaStreamSynchronize(nullptr), "upload: page table");
    } else {
        reserve(std::max(size, 1));
    }
    check_cuda(cudaMemset(pool_, 0, static_cast<std::size_t>(capacity_pages_) * layout_.page_bytes),
               "upload");
    for (int p = 0; p < pages; ++p)
        if (store.held(p))
            check_cuda(cudaMemcpy(slot_data(p), store.page_data(p), layout_.page_bytes,
                                  cudaMemcpyHostToDevice),
                       "upload");
}

void DevicePagePool::download(PagedStore& store, int size) const {
    if (!same_layout(store.layout(), layout_))
        throw std::invalid_argument("download: page layout differs");
    if (!mapped_) store.reserve_tokens(size);
    check_cuda(cudaDeviceSynchronize(), "download: synchronize");
    for (int p = 0; p < (size + layout_.tokens_per_page - 1) / layout_.tokens_per_page; ++p) {
        if (!held(p)) {
            store.evict(p);
            continue;
        }
        uint8_t* dst = store.held(p) ? store.page_data(p) : store.allocate_page(p);
        check_cuda(cudaMemcpy(dst, slot_data(p), layout_.page_bytes, cudaMemcpyDeviceToHost),
                   "download");
    }
}

void DevicePagePool::copy_page(int page, void* host) const {
    if (!held(page) || host == nullptr)
        throw std::out_of_range("copy_page: page " + std::to_string(page) + " is not held");
    check_cuda(cudaDeviceSynchronize(), "copy_page: synchronize");
    check_cuda(cudaMemcpy(host, slot_data(page), layout_.page_bytes, cudaMemcpyDeviceToHost),
               "copy_page");
}

}  // namespace veloxquant::cuda
