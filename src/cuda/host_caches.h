// How the device caches meet the CPU's: the quantized cache and sliding window a CPU cache is
// (what from_host takes), an empty CPU cache of a device cache's parameters (what to_host
// fills), the window around it, and the cache files both device caches load. Shared by
// CudaTurboQuantCache and CudaCodecCache.
#pragma once

#include <memory>
#include <string>

#include "cuda/codec_params_view.h"
#include "veloxquant/caches.h"
#include "veloxquant/config.h"

namespace veloxquant::cuda {

/// A CPU cache as a device cache takes it: its quantized cache and its sliding window
/// (window.window = 0: none).
struct HostCacheParts {
    const QuantizedKVCache& cache;
    TokenWindow window;
};

/// The parts of a QuantizedKVCache, or of a SlidingWindowKVCache around one; throws
/// std::invalid_argument naming `who` for any other cache class.
HostCacheParts host_cache_parts(const KVCache& cpu, const char* who);

/// An empty CPU cache of these parameters: the factory's cache for config.method, which must be
/// a QuantizedKVCache (std::logic_error otherwise).
std::unique_ptr<QuantizedKVCache> make_quantized_cache(const KVCacheConfig& config, int num_heads,
                                                       int head_dim, int max_seq_len, int layer);

/// `cache` in a SlidingWindowKVCache of this window and sinks, or `cache` itself without one.
std::unique_ptr<KVCache> with_window(std::unique_ptr<QuantizedKVCache> cache,
                                     const TokenWindow& window);

/// KVCache::load(path) of a cache a device cache can hold (a QuantizedKVCache or a
/// SlidingWindowKVCache around one); throws std::invalid_argument naming `who` for another
/// class, and KVCache::load's errors for a truncated, corrupted or forged file.
std::unique_ptr<KVCache> load_host_cache(const std::string& path, const char* who);

}  // namespace veloxquant::cuda
