#include "veloxquant/factory.h"

#include <stdexcept>
#include <string>

#include "veloxquant/caches.h"
#include "veloxquant/calibration.h"

namespace veloxquant {

std::unique_ptr<KVCache> KVCacheFactory::create(const KVCacheConfig& config, int num_heads,
                                                int head_dim, int max_seq_len) {
    return create(config, num_heads, head_dim, max_seq_len, 0);
}

std::unique_ptr<KVCache> KVCacheFactory::create(const KVCacheConfig& config, int num_heads,
                                                int head_dim, int max_seq_len, int layer) {
    return create(std::make_shared<const KVCacheConfig>(config), num_heads, head_dim, max_seq_len,
                  layer);
}

std::unique_ptr<KVCache> KVCacheFactory::create(std::shared_ptr<const KVCacheConfig> c,
                                                int num_heads, int head_dim, int max_seq_len,
                                                int layer) {
    if (!c) throw std::invalid_argument("KVCacheFactory::create: null configuration");
    c->validate();
    const std::string& m = c->method;
    if (m == "turboquant_rvq")
        return std::make_unique<TurboQuantRVQKVCache>(c, num_heads, head_dim, max_seq_len, layer);
    if (m == "qjl") return std::make_unique<QJLKVCache>(c, num_heads, head_dim, max_seq_len, layer);
    if (m == "polarquant")
        return std::make_unique<PolarQuantKVCache>(c, num_heads, head_dim, max_seq_len, layer);
    if (m == "rabitq")
        return std::make_unique<RaBitQKVCache>(c, num_heads, head_dim, max_seq_len, layer);
    if (m == "commvq")
        return std::make_unique<CommVQKVCache>(c, num_heads, head_dim, max_seq_len, layer);
    if (m == "ratequant")
        return std::make_unique<RateQuantKVCache>(c, num_heads, head_dim, max_seq_len, layer);
    if (m == "spectral")
        return std::make_unique<SpectralQuantKVCache>(c, num_heads, head_dim, max_seq_len, layer);
    if (m == "vecinfer")
        return std::make_unique<VecInferKVCache>(c, num_heads, head_dim, max_seq_len, layer);
    if (m == "fp16")
        return std::make_unique<FP16KVCache>(c, num_heads, head_dim, max_seq_len, layer);
    // The codec registry names what a remaining method needs (e.g. calibration).
    return std::make_unique<QuantizedKVCache>(c, num_heads, head_dim, max_seq_len, layer,
                                              "QuantizedKVCache");
}

std::vector<std::unique_ptr<KVCache>> KVCacheBuilder::build(const ModelShape& model,
                                                            const KVCacheConfig& config,
                                                            int max_seq_len) {
    if (model.layers.empty())
        throw std::invalid_argument("KVCacheBuilder: the model has no layers");
    std::vector<std::unique_ptr<KVCache>> caches;
    caches.reserve(model.layers.size());
    const auto shared = std::make_shared<const KVCacheConfig>(config);
    for (std::size_t l = 0; l < model.layers.size(); ++l)
        caches.push_back(KVCacheFactory::create(shared, model.layers[l].num_kv_heads,
                                                model.layers[l].head_dim, max_seq_len,
                                                static_cast<int>(l)));
    return caches;
}

std::vector<std::unique_ptr<KVCache>> KVCacheBuilder::build(const ModelShape& model,
                                                            KVCacheConfig config,
                                                            const Calibration& calibration,
                                                            int max_seq_len) {
    check_calibration_shape(calibration, model);
    apply_calibration(calibration, config);
    return build(model, config, max_seq_len);
}

}  // namespace veloxquant
