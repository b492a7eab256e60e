#include "methods/ratequant.h"

#include <string>

namespace veloxquant {

int ratequant_bits(const KVCacheConfig& config, int layer, int head) {
    const auto& a = config.bit_allocation;
    auto it = a.find(std::to_string(layer) + "." + std::to_string(head));
    if (it != a.end()) return it->second;
    it = a.find(std::to_string(layer));
    if (it != a.end()) return it->second;
    return config.bits;
}

}  // namespace veloxquant
