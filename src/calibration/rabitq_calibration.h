// RaBitQ IVF centroids from calibration activations instead of the first prefill.
#pragma once

#include "calibration/activations.h"
#include "veloxquant/config.h"

namespace veloxquant {

/// Centroids [layers][kv_heads][config.num_clusters][head_dim] in the key domain, for
/// KVCacheConfig.ivf_centroids. Each (layer, head) runs exactly the codec's own training
/// (RaBitQCodec::train: the same evenly spaced subset, the same seeded k-means on keys rotated by
/// that head's rotation), then rotates the centroids back, so a codec built with them holds what
/// training on the collected keys would have given it. Throws std::invalid_argument when the
/// activations are empty, heads differ in shape, or a head has fewer keys than num_clusters.
FloatArray calibrate_rabitq_centroids(const Activations& activations, const KVCacheConfig& config);

}  // namespace veloxquant
