// KVCacheFactory and KVCacheBuilder (seed: veloxquant_mlx.cache.base).
#pragma once

#include <memory>
#include <vector>

#include "veloxquant/cache.h"
#include "veloxquant/config.h"

namespace veloxquant {

struct Calibration;

/// Per-layer attention shape of a model: what KVCacheBuilder needs to make one cache per layer.
struct ModelShape {
    struct Layer {
        int num_kv_heads = 0;
        int head_dim = 0;
    };
    std::vector<Layer> layers;
};

struct KVCacheFactory {
    /// A single-layer cache (layer index 0 for the seeded random objects).
    static std::unique_ptr<KVCache> create(const KVCacheConfig& config, int num_heads, int head_dim,
                                           int max_seq_len = 8192);
    /// The same for layer `layer` of a model: rotations and sketches depend on
    /// (seed, layer, head, head_dim), and per-layer settings (ratequant) are looked up.
    static std::unique_ptr<KVCache> create(const KVCacheConfig& config, int num_heads, int head_dim,
                                           int max_seq_len, int layer);
    /// The same over a configuration shared by several caches (every layer of a model), so its
    /// arrays (codebooks, rotations, centroids) are held once.
    static std::unique_ptr<KVCache> create(std::shared_ptr<const KVCacheConfig> config,
                                           int num_heads, int head_dim, int max_seq_len, int layer);
};

struct KVCacheBuilder {
    /// One cache per layer, each with that layer's KV-head count and head dim.
    static std::vector<std::unique_ptr<KVCache>> build(const ModelShape& model,
                                                       const KVCacheConfig& config,
                                                       int max_seq_len = 8192);
    /// The same with a calibration (veloxquant/calibration.h): checks the shape against the
    /// calibration's model (std::invalid_argument naming both), fills config.method's fields
    /// from it (apply_calibration), then builds.
    static std::vector<std::unique_ptr<KVCache>> build(const ModelShape& model,
                                                       KVCacheConfig config,
                                                       const Calibration& calibration,
                                                       int max_seq_len = 8192);
};

}  // namespace veloxquant
