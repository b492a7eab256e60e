#include "calibration/rabitq_calibration.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "methods/key_codec.h"
#include "methods/rabitq.h"

namespace veloxquant {

FloatArray calibrate_rabitq_centroids(const Activations& acts, const KVCacheConfig& config) {
    if (acts.layers.empty() || acts.layers[0].keys.empty())
        throw std::invalid_argument("calibrate_rabitq_centroids: the activations hold no keys");
    const int64_t L = static_cast<int64_t>(acts.layers.size());
    const int64_t H = static_cast<int64_t>(acts.layers[0].keys.size());
    const int d = acts.layers[0].keys[0].dim;
    const int K = config.num_clusters;
    KVCacheConfig c = config;  // the codec trains itself: no centroids given
    c.method = "rabitq";
    c.ivf_centroids = FloatArray{};
    c.validate();
    FloatArray out;
    out.shape = {L, H, K, d};
    out.data.resize(static_cast<std::size_t>(L * H * K * d));
    for (int64_t l = 0; l < L; ++l) {
        if (static_cast<int64_t>(acts.layers[l].keys.size()) != H)
            throw std::invalid_argument("calibrate_rabitq_centroids: layer " + std::to_string(l) +
                                        " has " + std::to_string(acts.layers[l].keys.size()) +
                                        " KV heads, layer 0 has " + std::to_string(H));
        for (int64_t h = 0; h < H; ++h) {
            const HeadSamples& keys = acts.layers[l].keys[h];
            if (keys.dim != d)
                throw std::invalid_argument("calibrate_rabitq_centroids: layer " +
                                            std::to_string(l) + " head " + std::to_string(h) +
                                            " has dim " + std::to_string(keys.dim) + ", expected " +
                                            std::to_string(d));
            if (keys.count() < K)
                throw std::invalid_argument(
                    "calibrate_rabitq_centroids: layer " + std::to_string(l) + " head " +
                    std::to_string(h) + " has " + std::to_string(keys.count()) +
                    " keys, fewer than num_clusters = " + std::to_string(K) +
                    "; collect more tokens");
            // The factory's codec, so the rotation and k-means seeds are the cache's own.
            const auto made = make_key_codec(c, d, static_cast<int>(l), static_cast<int>(h));
            auto& codec = dynamic_cast<RaBitQCodec&>(*made);
            codec.train(keys.data.data(), static_cast<int>(keys.count()));
            float* dst = &out.data[static_cast<std::size_t>((l * H + h) * K * d)];
            for (int k = 0; k < K; ++k)
                codec.rotation().inverse(&codec.centroids()[static_cast<std::size_t>(k) * d],
                                         dst + static_cast<std::size_t>(k) * d);
        }
    }
    return out;
}

}  // namespace veloxquant
