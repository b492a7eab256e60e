// Attention over a paged quantized cache: fused (scores and the value sum computed from the
// packed codes through the codecs' scorers) or unfused (each page dequantized, then dense).
// Threaded with OpenMP over (KV head, query-row tile, page chunk) work items whose partial
// online-softmax states are merged exactly (flash-decoding split-K).
#pragma once

#include <memory>
#include <vector>

namespace veloxquant {

class KeyCodec;
class ValueCodec;
class PagedStore;
class OutlierStore;

struct PagedAttentionArgs {
    const PagedStore* store = nullptr;
    const std::vector<std::unique_ptr<KeyCodec>>* key_codecs = nullptr;
    const std::vector<std::unique_ptr<ValueCodec>>* value_codecs = nullptr;
    const OutlierStore* outliers = nullptr;  ///< may be null
    int num_heads = 0;
    int head_dim = 0;
    int size = 0;  ///< positions appended
    const float* queries = nullptr;
    int num_q_heads = 0;
    int n_queries = 0;
    float* out = nullptr;
    float scale = 1.0f;
    bool causal = false;
    int sinks = 0;   ///< with window > 0: positions below sinks stay visible
    int window = 0;  ///< > 0: a query at position q sees (q - window, q] and the sinks
    bool fused = true;
};

void paged_attention(const PagedAttentionArgs& args);

}  // namespace veloxquant
