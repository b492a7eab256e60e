// DevicePagePool: the pages of one device-resident cache in the CPU's page layout (PagedStore),
// one contiguous pool with an identity page table, grown by doubling up to a bound. Shared by
// CudaTurboQuantCache and CudaCodecCache; also moves pages to and from a CPU PagedStore.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cache/paged_store.h"

namespace veloxquant::cuda {

class DevicePagePool {
public:
    /// max_tokens bounds the pool (the cache's max_seq_len). Allocates nothing yet.
    DevicePagePool(const PageLayout& layout, int max_tokens);
    ~DevicePagePool();
    DevicePagePool(const DevicePagePool&) = delete;
    DevicePagePool& operator=(const DevicePagePool&) = delete;

    /// Makes room for positions [0, n_tokens): a larger pool (at least double, 16 pages at
    /// first) holding the old pages. Synchronizes the device when it grows.
    void reserve(int n_tokens);

    uint8_t* pool() const { return pool_; }
    const int32_t* page_table() const { return page_table_; }
    int capacity_pages() const { return capacity_pages_; }
    const PageLayout& layout() const { return layout_; }
    std::size_t page_bytes() const { return layout_.page_bytes; }
    /// Device bytes of the pages and the page table.
    std::size_t nbytes() const;

    /// Replaces the first pages with those holding positions [0, size) of a CPU store of the
    /// same layout (every one held); the rest is zeroed. Synchronous.
    void upload(const PagedStore& store, int size);
    /// Copies the pages holding positions [0, size) into a CPU store of the same layout
    /// (allocating pages as needed). Synchronous.
    void download(PagedStore& store, int size) const;
    /// Copies page `page` (< capacity_pages()) into page_bytes() of host memory. Synchronous.
    void copy_page(int page, void* host) const;

private:
    PageLayout layout_;
    int max_pages_;
    int capacity_pages_ = 0;
    uint8_t* pool_ = nullptr;
    int32_t* page_table_ = nullptr;
};

}  // namespace veloxquant::cuda
