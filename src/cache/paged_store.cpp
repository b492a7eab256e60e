#include "cache/paged_store.h"

#include <cstdlib>
#include <cstring>
#include <new>

namespace veloxquant {
namespace {

constexpr std::size_t kAlign = 64;

std::size_t align_up(std::size_t n) {
    return (n + kAlign - 1) / kAlign * kAlign;
}

}  // namespace

void PageLayout::finalize() {
    const std::size_t p = static_cast<std::size_t>(tokens_per_page);
    std::size_t at = 0;
    for (HeadLayout& h : heads) {
        h.key_codes_offset = at;
        h.key_scalars_offset = align_up(h.key_codes_offset + p * h.key_code_bytes);
        h.value_codes_offset = align_up(h.key_scalars_offset + p * sizeof(float) * h.key_scalars);
        h.value_scalars_offset = align_up(h.value_codes_offset + p * h.value_code_bytes);
        at = align_up(h.value_scalars_offset + p * sizeof(float) * h.value_scalars);
    }
    page_bytes = at;
}

bool same_layout(const PageLayout& a, const PageLayout& b) {
    if (a.tokens_per_page != b.tokens_per_page || a.page_bytes != b.page_bytes ||
        a.heads.size() != b.heads.size())
        return false;
    for (std::size_t h = 0; h < a.heads.size(); ++h) {
        const HeadLayout &x = a.heads[h], &y = b.heads[h];
        if (x.key_codes_offset != y.key_codes_offset ||
            x.key_scalars_offset != y.key_scalars_offset ||
            x.value_codes_offset != y.value_codes_offset ||
            x.value_scalars_offset != y.value_scalars_offset)
            return false;
    }
    return true;
}

PagedStore::PagedStore(PageLayout layout) : layout_(layout) {
    layout_.finalize();
}

PagedStore::~PagedStore() {
    clear();
}

uint8_t* PagedStore::allocate_page(int page) {
    if (page >= page_slots()) pages_.resize(static_cast<std::size_t>(page) + 1, nullptr);
    if (pages_[page] == nullptr) {
        void* mem = std::aligned_alloc(kAlign, layout_.page_bytes);
        if (mem == nullptr) throw std::bad_alloc();
        std::memset(mem, 0, layout_.page_bytes);
        pages_[page] = static_cast<uint8_t*>(mem);
        ++held_;
    }
    return pages_[page];
}

void PagedStore::reserve_tokens(int n_tokens) {
    const int needed = (n_tokens + layout_.tokens_per_page - 1) / layout_.tokens_per_page;
    if (needed <= page_slots()) return;
    // Allocate everything first so a failure leaves the table as it was.
    std::vector<uint8_t*> fresh;
    fresh.reserve(static_cast<std::size_t>(needed - page_slots()));  // push_back cannot throw
    try {
        for (int p = page_slots(); p < needed; ++p) {
            void* mem = std::aligned_alloc(kAlign, layout_.page_bytes);
            if (mem == nullptr) throw std::bad_alloc();
            std::memset(mem, 0, layout_.page_bytes);
            fresh.push_back(static_cast<uint8_t*>(mem));
        }
        pages_.reserve(static_cast<std::size_t>(needed));
    } catch (...) {
        for (uint8_t* m : fresh) std::free(m);
        throw;
    }
    for (uint8_t* m : fresh) pages_.push_back(m);
    held_ += static_cast<int>(fresh.size());
}

void PagedStore::truncate(int n_tokens) {
    const int P = layout_.tokens_per_page;
    const int keep = (n_tokens + P - 1) / P;
    while (page_slots() > keep) {
        evict(page_slots() - 1);
        pages_.pop_back();
    }
    // Zero the slots of the last page past n_tokens, as a fresh page has them: what a cache
    // saves then depends only on the tokens it holds, not on what it held before.
    const int slot = n_tokens % P, last = keep - 1;
    if (slot == 0 || !held(last)) return;
    const std::size_t rest = static_cast<std::size_t>(P - slot);
    for (int h = 0; h < static_cast<int>(layout_.heads.size()); ++h) {
        const HeadLayout& hl = layout_.heads[h];
        std::memset(key_codes(last, h) + slot * hl.key_code_bytes, 0, rest * hl.key_code_bytes);
        for (int s = 0; s < hl.key_scalars; ++s)
            std::memset(key_scalars(last, h) + s * P + slot, 0, rest * sizeof(float));
        std::memset(value_codes(last, h) + slot * hl.value_code_bytes, 0,
                    rest * hl.value_code_bytes);
        for (int s = 0; s < hl.value_scalars; ++s)
            std::memset(value_scalars(last, h) + s * P + slot, 0, rest * sizeof(float));
    }
}

void PagedStore::evict(int page) {
    if (page < page_slots() && pages_[page] != nullptr) {
        std::free(pages_[page]);
        pages_[page] = nullptr;
        --held_;
    }
}

void PagedStore::clear() {
    for (uint8_t*& p : pages_) {
        std::free(p);
        p = nullptr;
    }
    pages_.clear();
    pages_.shrink_to_fit();
    held_ = 0;
}

std::size_t PagedStore::nbytes() const {
    return static_cast<std::size_t>(held_) * layout_.page_bytes + pages_.size() * sizeof(uint8_t*);
}

}  // namespace veloxquant
