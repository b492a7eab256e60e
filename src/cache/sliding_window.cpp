#include <stdexcept>
#include <string>

#include "veloxquant/caches.h"

namespace veloxquant {

SlidingWindowKVCache::SlidingWindowKVCache(std::unique_ptr<QuantizedKVCache> inner, int window,
                                           int sink_tokens)
    : inner_(std::move(inner)), window_(window), sinks_(sink_tokens) {
    if (!inner_) throw std::invalid_argument("SlidingWindowKVCache: inner cache is null");
    if (window < 1)
        throw std::invalid_argument("SlidingWindowKVCache: window must be >= 1, got " +
                                    std::to_string(window));
    if (sink_tokens < 0)
        throw std::invalid_argument("SlidingWindowKVCache: sink_tokens must be >= 0, got " +
                                    std::to_string(sink_tokens));
}

void SlidingWindowKVCache::append(const float* keys, const float* values, int n_tokens) {
    const int before = inner_->size();
    inner_->append(keys, values, n_tokens);
    // Keep what the first new token's window needs, so a causal attend over this chunk is exact.
    inner_->evict_range(sinks_, before + 1 - window_);
}

void SlidingWindowKVCache::attend(const float* queries, int num_q_heads, int n_queries, float* out,
                                  float scale, bool causal) const {
    if (causal && n_queries > 1) {
        // Each query's window must still be held: the earliest query's start.
        const int first = inner_->size() - n_queries;
        const int from = first + 1 - window_;
        if (from > sinks_ && !inner_->position_held(std::max(from, 0)))
            throw std::invalid_argument("SlidingWindowKVCache: " + std::to_string(n_queries) +
                                        " causal queries reach tokens already evicted");
    }
    inner_->attend_window(queries, num_q_heads, n_queries, out, scale, causal, sinks_, window_);
}

void SlidingWindowKVCache::dequantize(int start, int n_tokens, float* keys_out,
                                      float* values_out) const {
    inner_->dequantize(start, n_tokens, keys_out, values_out);
}

void SlidingWindowKVCache::trim(int n_tokens) {
    if (n_tokens < 0 || n_tokens > inner_->size())
        throw std::invalid_argument("trim: cannot drop " + std::to_string(n_tokens) + " of " +
                                    std::to_string(inner_->size()) + " tokens");
    const int new_size = inner_->size() - n_tokens;
    // The new last token's window must still be held.
    const int from = new_size - window_;
    if (new_size > 0 && from > sinks_ && !inner_->position_held(from))
        throw std::invalid_argument("SlidingWindowKVCache: trimming to " +
                                    std::to_string(new_size) +
                                    " tokens would expose evicted positions");
    inner_->trim(n_tokens);
}

}  // namespace veloxquant
