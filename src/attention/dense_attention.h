// Dense float32 attention: the reference for every compressed path and the baseline the
// benchmarks time against. Same layouts and GQA mapping as KVCache::attend.
#pragma once

namespace veloxquant {

/// keys, values: [num_kv_heads][n_keys][d]; queries, out: [num_q_heads][n_queries][d].
/// With causal, query i sits at position n_keys - n_queries + i.
void dense_attention(const float* queries, int num_q_heads, int n_queries, const float* keys,
                     const float* values, int num_kv_heads, int n_keys, int d, float* out,
                     float scale, bool causal);

}  // namespace veloxquant
