#include "cuda/host_caches.h"

#include <stdexcept>
#include <string>
#include <utility>

#include "veloxquant/factory.h"

namespace veloxquant::cuda {

HostCacheParts host_cache_parts(const KVCache& cpu, const char* who) {
    if (const auto* q = dynamic_cast<const QuantizedKVCache*>(&cpu)) return {*q, TokenWindow{}};
    if (const auto* w = dynamic_cast<const SlidingWindowKVCache*>(&cpu))
        return {w->inner(), TokenWindow{w->sink_tokens(), w->window()}};
    throw std::invalid_argument(std::string(who) + ": a " + cpu.class_name() +
                                " cannot live on the device");
}

std::unique_ptr<QuantizedKVCache> make_quantized_cache(const KVCacheConfig& config, int num_heads,
                                                       int head_dim, int max_seq_len, int layer) {
    std::unique_ptr<KVCache> made =
        KVCacheFactory::create(config, num_heads, head_dim, max_seq_len, layer);
    std::unique_ptr<QuantizedKVCache> cpu(dynamic_cast<QuantizedKVCache*>(made.get()));
    if (!cpu) throw std::logic_error("to_host: the factory made no QuantizedKVCache");
    made.release();
    return cpu;
}

std::unique_ptr<KVCache> with_window(std::unique_ptr<QuantizedKVCache> cache,
                                     const TokenWindow& window) {
    if (window.window == 0) return cache;
    return std::make_unique<SlidingWindowKVCache>(std::move(cache), window.window, window.sinks);
}

std::unique_ptr<KVCache> load_host_cache(const std::string& path, const char* who) {
    std::unique_ptr<KVCache> cpu = KVCache::load(path);
    if (dynamic_cast<const QuantizedKVCache*>(cpu.get()) == nullptr &&
        dynamic_cast<const SlidingWindowKVCache*>(cpu.get()) == nullptr)
        throw std::invalid_argument(std::string(who) + ": " + path + " holds a " +
                                    cpu->class_name() + ", which the device cache cannot hold");
    return cpu;
}

}  // namespace veloxquant::cuda
