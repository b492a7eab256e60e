// What of the cache files (cache_io.cpp) other code needs: a config's bytes as a file stores
// them, which also serve as its identity (equal bytes, equal codecs for a given layer and shape).
#pragma once

#include <string>

#include "veloxquant/config.h"

namespace veloxquant {

/// Every field of `config` in the cache file's encoding.
std::string config_bytes(const KVCacheConfig& config);

}  // namespace veloxquant
