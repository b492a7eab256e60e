// DevicePagePool: the pages of one device-resident cache in the CPU's page layout (PagedStore),
// one contiguous pool with an identity page table, grown by a quarter (and to the allocator's
// granule) up to a bound. Shared by CudaTurboQuantCache and CudaCodecCache; also moves pages to
// and from a CPU PagedStore.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cache/paged_store.h"

namespace veloxquant::cuda {

/// cudaMalloc hands out blocks above 1 MiB in whole granules of this size (on the H200 a
/// 28.01 MiB request took 30 MiB, a 2.004 MiB one 4 MiB, while 1 MiB and less took what was
/// asked in 32 KB steps: bench/results/cuda_h200_20261202u_spectral_stack_pool_growth.txt), so
/// a larger pool's tail up to the next granule is held either way.
constexpr std::size_t kAllocationGranule = std::size_t{2} << 20;

/// The pages a pool of `capacity` pages grows to so as to hold `needed` (> capacity): at least a
/// quarter more than it held and 16 at first, then, above 1 MiB, as many as fill the last 2 MiB
/// granule, at most max_pages. A quarter instead of a doubling: a cache created for a long
/// max_seq_len holds at most ~25% of unused pages, and re-copying its pool ~3 times per doubling of
/// the context costs a device copy of well under a millisecond each.
int grown_pool_pages(int needed, int capacity, int max_pages, std::size_t page_bytes);

class DevicePagePool {
public:
    /// max_tokens bounds the pool (the cache's max_seq_len). Allocates nothing yet.
    DevicePagePool(const PageLayout& layout, int max_tokens);
    ~DevicePagePool();
    DevicePagePool(const DevicePagePool&) = delete;
    DevicePagePool& operator=(const DevicePagePool&) = delete;

    /// Makes room for positions [0, n_tokens): a larger pool (grown_pool_pages) holding the old
    /// pages. Synchronizes the device when it grows.
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
