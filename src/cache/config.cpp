#include "veloxquant/config.h"

#include <limits>
#include <stdexcept>
#include <string>

#include "core/half.h"

namespace veloxquant {

int64_t FloatArray::shape_size() const {
    constexpr int64_t kLimit = int64_t{1} << 62;
    int64_t n = 1;
    for (int64_t e : shape) {
        if (e < 0 || (e > 0 && n > kLimit / e)) return -1;
        n *= e;
    }
    return n;
}

const std::vector<std::string>& known_methods() {
    static const std::vector<std::string> methods = {"turboquant_rvq", "vecinfer", "ratequant",
                                                     "spectral",       "rabitq",   "qjl",
                                                     "polarquant",     "commvq",   "fp16"};
    return methods;
}

namespace {

void check_range(const char* field, int value, int lo, int hi) {
    if (value < lo || value > hi)
        throw std::invalid_argument(std::string("KVCacheConfig.") + field + " must be in " +
                                    std::to_string(lo) + ".." + std::to_string(hi) + ", got " +
                                    std::to_string(value));
}

}  // namespace

void KVCacheConfig::validate() const {
    bool known = false;
    std::string all;
    for (const auto& m : known_methods()) {
        known = known || m == method;
        all += (all.empty() ? "" : ", ") + m;
    }
    if (!known)
        throw std::invalid_argument("unknown method '" + method + "'; choose one of: " + all);
    check_range("bits", bits, 1, 8);
    if (!((value_bits >= 1 && value_bits <= 8) || value_bits == 16))
        throw std::invalid_argument("KVCacheConfig.value_bits must be in 1..8 or 16 (fp16), got " +
                                    std::to_string(value_bits));
    check_range("num_residuals", num_residuals, 1, 8);
    if (outlier_bits != 8 && outlier_bits != 16)
        throw std::invalid_argument(
            "KVCacheConfig.outlier_bits must be 8 (int8) or 16 (fp16), got " +
            std::to_string(outlier_bits));
    check_range("sketch_dim", sketch_dim, 1, 8192);
    check_range("num_clusters", num_clusters, 1, 65536);
    if (num_subspaces) check_range("num_subspaces", *num_subspaces, 1, 1024);
    check_range("signal_bits", signal_bits, 0, 8);
    check_range("noise_bits", noise_bits, 0, 8);
    for (const auto& [key, b] : bit_allocation) {
        // "L" or "L.H" with non-negative integers.
        const auto dot = key.find('.');
        auto is_index = [](const std::string& s) {
            return !s.empty() && s.size() < 7 &&
                   s.find_first_not_of("0123456789") == std::string::npos;
        };
        const bool ok = dot == std::string::npos
                            ? is_index(key)
                            : is_index(key.substr(0, dot)) && is_index(key.substr(dot + 1));
        if (!ok)
            throw std::invalid_argument("KVCacheConfig.bit_allocation key '" + key +
                                        "' must be \"L\" (layer) or \"L.H\" (layer.head)");
        if (b < 1 || b > 8)
            throw std::invalid_argument("KVCacheConfig.bit_allocation['" + key +
                                        "'] must be in 1..8, got " + std::to_string(b));
    }
    if (rope_half_split && method == "commvq" && !rope_inv_freq.empty())
        throw std::invalid_argument(
            "KVCacheConfig.rope_half_split: commvq's RoPE-commuting codebooks turn adjacent pairs "
            "(2i, 2i + 1); drop rope_inv_freq or rope_half_split");
    if (center_keys) {
        // Their calibrations (codebooks, bases, smoothing, centroids) were fitted to the keys as
        // they are; centred keys would not match them.
        if (method == "commvq" || method == "vecinfer" || method == "spectral")
            throw std::invalid_argument("KVCacheConfig.center_keys: " + method +
                                        " is calibrated on uncentred keys; use it without "
                                        "center_keys");
        if (method == "rabitq" && !ivf_centroids.empty())
            throw std::invalid_argument(
                "KVCacheConfig.center_keys: rabitq's calibrated ivf_centroids were fitted to "
                "uncentred keys; drop them (rabitq then trains on the centred keys) or "
                "center_keys");
    }
}

int KVCacheConfig::stored_value_bits() const {
    return method == "fp16" ? 16 : value_bits;
}

float KVCacheConfig::key_bound() const {
    const bool fp16 = method == "fp16" || (outlier_observer && outlier_bits == 16);
    return fp16 ? kHalfOverflow : std::numeric_limits<float>::infinity();
}

float KVCacheConfig::value_bound() const {
    const bool fp16 = stored_value_bits() == 16 || (outlier_observer && outlier_bits == 16);
    return fp16 ? kHalfOverflow : std::numeric_limits<float>::infinity();
}

}  // namespace veloxquant
