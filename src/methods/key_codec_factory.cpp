// Maps config.method to the key codec of one (layer, head).
#include <stdexcept>
#include <string>

#include "core/rng.h"
#include "methods/centered_key_codec.h"
#include "methods/commvq.h"
#include "methods/fp16_codec.h"
#include "methods/key_codec.h"
#include "methods/polarquant.h"
#include "methods/qjl.h"
#include "methods/rabitq.h"
#include "methods/ratequant.h"
#include "methods/spectral.h"
#include "methods/turboquant_rvq.h"
#include "methods/vecinfer.h"

namespace veloxquant {

namespace {

std::unique_ptr<KeyCodec> make_method_codec(const KVCacheConfig& config, int head_dim, int layer,
                                            int head) {
    const uint64_t seed =
        derive_seed(config.seed, layer, head, head_dim, RandomPurpose::kKeyRotation);
    const std::string& m = config.method;
    if (m == "turboquant_rvq")
        return std::make_unique<TurboQuantRVQCodec>(head_dim, config.bits, config.num_residuals,
                                                    config.use_hadamard, seed);
    if (m == "fp16") return std::make_unique<FP16Codec>(head_dim);
    if (m == "ratequant")
        return std::make_unique<TurboQuantRVQCodec>(head_dim, ratequant_bits(config, layer, head),
                                                    1, config.use_hadamard, seed);
    if (m == "qjl") {
        if (config.bits != 1)
            throw std::invalid_argument(
                "qjl stores one sign bit per sketch row; bits must be 1 "
                "(set sketch_dim for the rate), got " +
                std::to_string(config.bits));
        return std::make_unique<QJLCodec>(
            head_dim, config.sketch_dim,
            derive_seed(config.seed, layer, head, head_dim, RandomPurpose::kSketch));
    }
    if (m == "polarquant")
        return std::make_unique<PolarQuantCodec>(head_dim, config.bits, config.use_hadamard, seed);
    if (m == "rabitq")
        return std::make_unique<RaBitQCodec>(
            head_dim, config.bits, config.num_clusters, config.use_hadamard, seed,
            rabitq_calibrated_centroids(config, layer, head, head_dim));
    if (m == "spectral") return make_spectral_codec(config, head_dim, layer, head);
    if (m == "commvq") return make_commvq_codec(config, head_dim, layer, head);
    if (m == "vecinfer") return make_vecinfer_codec(config, head_dim, layer, head);
    throw std::invalid_argument("unknown method '" + m + "'");
}

}  // namespace

std::unique_ptr<KeyCodec> make_key_codec(const KVCacheConfig& config, int head_dim, int layer,
                                         int head) {
    auto codec = make_method_codec(config, head_dim, layer, head);
    if (!config.center_keys) return codec;
    return std::make_unique<CenteredKeyCodec>(std::move(codec), config.rope_inv_freq,
                                              config.rope_half_split);
}

}  // namespace veloxquant
