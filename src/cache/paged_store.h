// PagedStore: per-page, per-KV-head structure-of-arrays storage of packed codes.
//
// Page layout (P tokens per page, every region 64-byte aligned), for each head h in turn:
//   key codes      [P][key_code_bytes]
//   key scalars    [key_scalars][P]      float32
//   value codes    [P][value_code_bytes]
//   value scalars  [value_scalars][P]    float32
// Token position t lives in page t / P, slot t % P. Pages are allocated as the cache grows and
// can be freed individually (sliding window) or from the end (trim).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace veloxquant {

/// Sizes and offsets of one KV head's regions inside a page (heads may differ, e.g. ratequant's
/// per-head bit widths).
struct HeadLayout {
    std::size_t key_code_bytes = 0;
    int key_scalars = 0;
    std::size_t value_code_bytes = 0;
    int value_scalars = 0;

    std::size_t key_codes_offset = 0;
    std::size_t key_scalars_offset = 0;
    std::size_t value_codes_offset = 0;
    std::size_t value_scalars_offset = 0;
};

struct PageLayout {
    int tokens_per_page = 0;
    std::vector<HeadLayout> heads;
    std::size_t page_bytes = 0;

    /// Fills the offsets from the sizes.
    void finalize();
};

/// True when two layouts place every region of every head at the same offsets.
bool same_layout(const PageLayout& a, const PageLayout& b);

class PagedStore {
public:
    explicit PagedStore(PageLayout layout);
    ~PagedStore();
    PagedStore(const PagedStore&) = delete;
    PagedStore& operator=(const PagedStore&) = delete;

    const PageLayout& layout() const { return layout_; }
    int tokens_per_page() const { return layout_.tokens_per_page; }
    /// Number of page slots (held or evicted) covering the positions so far.
    int page_slots() const { return static_cast<int>(pages_.size()); }
    bool held(int page) const { return page < page_slots() && pages_[page] != nullptr; }
    int pages_held() const { return held_; }

    /// Makes sure pages exist for positions [0, n_tokens); new pages are zero-filled. Throws
    /// std::bad_alloc without changing anything already held.
    void reserve_tokens(int n_tokens);
    /// Frees every page that holds no position below n_tokens and zeroes the slots past
    /// n_tokens in the last one.
    void truncate(int n_tokens);
    void evict(int page);
    void clear();

    uint8_t* key_codes(int page, int head) const {
        return pages_[page] + layout_.heads[head].key_codes_offset;
    }
    float* key_scalars(int page, int head) const {
        return reinterpret_cast<float*>(pages_[page] + layout_.heads[head].key_scalars_offset);
    }
    uint8_t* value_codes(int page, int head) const {
        return pages_[page] + layout_.heads[head].value_codes_offset;
    }
    float* value_scalars(int page, int head) const {
        return reinterpret_cast<float*>(pages_[page] + layout_.heads[head].value_scalars_offset);
    }
    const uint8_t* page_data(int page) const { return pages_[page]; }
    uint8_t* page_data(int page) { return pages_[page]; }
    /// Allocates a zeroed page at slot `page` (growing the table), for loading.
    uint8_t* allocate_page(int page);

    /// Bytes held by pages plus the page table.
    std::size_t nbytes() const;

private:
    PageLayout layout_;
    std::vector<uint8_t*> pages_;
    int held_ = 0;
};

}  // namespace veloxquant
