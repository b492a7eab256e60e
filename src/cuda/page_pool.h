// DevicePagePool: the pages of one device-resident cache in the CPU's page layout (PagedStore),
// one contiguous pool with an identity page table, grown by a quarter (and to the allocator's
// granule) up to a bound. Shared by CudaTurboQuantCache and CudaCodecCache; also moves pages to
// and from a CPU PagedStore. A mapped pool (a sliding window's: map_pages) instead hands out
// slots of the pool to the pages held and takes them back as pages are evicted, its page table
// mapping every page of the positions to its slot, so that its memory follows the pages held.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

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
    /// pages. Synchronizes the device when it grows. Identity pools only.
    void reserve(int n_tokens);

    /// Turns this pool, holding no page yet, into a mapped one: a page table over every page
    /// up to the bound, no page held.
    void map_pages();
    bool mapped() const { return mapped_; }
    /// Mapped pools: gives each page of [first, end) not held a free slot (the pool grows as
    /// reserve's does when none is left, synchronizing the device) and writes their page table
    /// entries on `stream`. Throws std::out_of_range past the bound.
    void hold(int first, int end, cudaStream_t stream);
    /// Mapped pools: takes back the slots of the pages of [first, end) held (their codes stay
    /// until the slot is handed out again).
    void release(int first, int end);
    /// Whether page `page` holds codes: below the capacity of an identity pool, or held.
    bool held(int page) const;
    /// Throws std::out_of_range (a dequantize's) unless every page of positions
    /// [start, start + n) holds codes (n > 0).
    void require_held(int start, int n) const;
    /// A mapped pool of a sliding window (`window` positions, `sinks` sinks) cut from `size`
    /// positions to n (a truncate's): throws std::invalid_argument, changing nothing, where the
    /// new last position's window starts on a page not held; else gives back the pages past n.
    void cut_window(int n, int size, int window, int sinks);

    uint8_t* pool() const { return pool_; }
    const int32_t* page_table() const { return page_table_; }
    int capacity_pages() const { return capacity_pages_; }
    /// The pages of max_tokens positions (the bound).
    int max_pages() const { return max_pages_; }
    const PageLayout& layout() const { return layout_; }
    std::size_t page_bytes() const { return layout_.page_bytes; }
    /// Device bytes of the pages and the page table.
    std::size_t nbytes() const;

    /// Replaces the first pages with those holding positions [0, size) of a CPU store of the
    /// same layout (every one held; a mapped pool takes the ones held and no others); the rest
    /// is zeroed. Synchronous.
    void upload(const PagedStore& store, int size);
    /// Copies the pages holding positions [0, size) into a CPU store of the same layout
    /// (allocating pages as needed; a mapped pool's pages not held are evicted there).
    /// Synchronous.
    void download(PagedStore& store, int size) const;
    /// Copies page `page` (held) into page_bytes() of host memory. Synchronous.
    void copy_page(int page, void* host) const;

private:
    /// Reallocates the pool at `pages` slots (more than it has), keeping the old slots' bytes
    /// and zeroing the rest; an identity pool's table grows with it.
    void grow(int pages);
    uint8_t* slot_data(int page) const;

    PageLayout layout_;
    int max_pages_;
    int capacity_pages_ = 0;
    uint8_t* pool_ = nullptr;
    int32_t* page_table_ = nullptr;
    bool mapped_ = false;
    std::vector<int32_t> slot_of_;     ///< mapped: each page's slot, -1 where not held
    std::vector<int32_t> free_slots_;  ///< mapped: slots no page holds
};

}  // namespace veloxquant::cuda
