// Activations gathered from a model for calibration: per layer and KV head, sub-sampled rows of
// the keys (after RoPE, as the cache receives them), the values, and the queries of the heads
// that read that KV head. Every calibration routine takes this and nothing model-specific.
#pragma once

#include <cstdint>
#include <vector>

namespace veloxquant {

/// Rows of one KV head: data [count][dim], row-major; positions[i] is row i's token position
/// within its sequence (what RoPE rotated it by; -1 where unknown).
struct HeadSamples {
    int dim = 0;
    std::vector<float> data;
    std::vector<int32_t> positions;

    int64_t count() const { return dim == 0 ? 0 : static_cast<int64_t>(data.size()) / dim; }
    const float* row(int64_t i) const { return data.data() + i * dim; }
};

struct LayerActivations {
    std::vector<HeadSamples> keys;     ///< [num_kv_heads], post-RoPE
    std::vector<HeadSamples> values;   ///< [num_kv_heads]
    std::vector<HeadSamples> queries;  ///< [num_kv_heads]: queries of the group's heads, post-RoPE
};

/// RoPE of the model the activations came from: pair (x[2i], x[2i+1]) at position p is rotated
/// by p * inv_freq[i] (adjacent-pair "normal" RoPE, as in model/llama_model.h); empty inv_freq
/// means the rotation is unknown.
struct RopeSpec {
    std::vector<double> inv_freq;  ///< [rope_dim / 2]
};

struct Activations {
    std::vector<LayerActivations> layers;
    RopeSpec rope;
};

}  // namespace veloxquant
