// Fuzz target: Calibration::load on calibration files with arbitrary payloads (the CRC is made
// valid, so forged content reaches the parser). A file either throws std::runtime_error or loads
// a calibration whose every section configures caches for every layer of the model it names,
// or is refused there with the codec's std::invalid_argument (an eigenbasis that is not
// orthonormal, say: the loader checks shapes and ranges, the codecs what their math needs), and
// those caches encode, attend and dequantize. A crash or sanitizer report is a finding.
#include <stdexcept>
#include <vector>

#include "fuzz_input.h"
#include "veloxquant/calibration.h"
#include "veloxquant/veloxquant.h"

namespace {

using namespace veloxquant;

// Header: magic (8), format version (4), payload length (8), payload CRC-32 (4).
constexpr std::size_t kLengthAt = 12, kCrcAt = 20, kPayloadAt = 24;
constexpr int kTokens = 3;
// Models larger than this (KV heads x head_dim summed over layers) are loaded, not exercised.
constexpr long kMaxWidth = 1 << 14;

void run_layer(const KVCacheConfig& config, int layer, int heads, int d) {
    std::unique_ptr<KVCache> cache;
    try {
        cache = KVCacheFactory::create(config, heads, d, 64, layer);
    } catch (const std::invalid_argument& e) {
        vqfuzz::rejected(e);
        return;
    }
    const std::size_t n = static_cast<std::size_t>(heads) * kTokens * d;
    std::vector<float> k(n), v(n), q(static_cast<std::size_t>(heads) * d), out(q.size());
    vqfuzz::fill(k.data(), n, 3 + layer);
    vqfuzz::fill(v.data(), n, 5 + layer);
    vqfuzz::fill(q.data(), q.size(), 9);
    cache->append(k.data(), v.data(), kTokens);
    cache->attend(q.data(), heads, 1, out.data(), 0.125f, false);
    cache->dequantize(0, kTokens, k.data(), v.data());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
    static const std::string path = vqfuzz::temp_path("calibration.bin");
    write_file_atomic(path, vqfuzz::with_valid_checksum(data, size, kLengthAt, kCrcAt, kPayloadAt));
    Calibration cal;
    try {
        cal = Calibration::load(path);
    } catch (const std::runtime_error& e) {
        vqfuzz::rejected(e);
        return 0;  // the expected outcome for most inputs
    }
    const auto& layers = cal.model.shape.layers;
    long width = 0;
    for (const auto& l : layers) width += static_cast<long>(l.num_kv_heads) * l.head_dim;
    if (width > kMaxWidth) return 0;
    check_calibration_shape(cal, cal.model.shape);
    for (const std::string& method : cal.sections()) {
        KVCacheConfig config;
        config.method = method;
        apply_calibration(cal, config);
        for (std::size_t l = 0; l < layers.size(); ++l)
            run_layer(config, static_cast<int>(l), layers[l].num_kv_heads, layers[l].head_dim);
    }
    return 0;
}
