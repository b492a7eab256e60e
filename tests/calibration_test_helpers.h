// Helpers shared by the calibration tests: seeded arrays, synthetic activations and a method's
// config calibrated on them.
#pragma once

#include <cstdint>
#include <vector>

#include "calibration/activations.h"
#include "calibration/calibrate.h"
#include "test_helpers.h"
#include "veloxquant/calibration.h"
#include "veloxquant/config.h"

namespace vqtest {

/// A FloatArray of the given shape holding N(0, 1) draws.
inline veloxquant::FloatArray array(std::vector<int64_t> shape, uint64_t seed) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return veloxquant::FloatArray{randn(static_cast<std::size_t>(n), seed), std::move(shape)};
}

/// layers x heads of Gaussian keys (offset 0.3, scale growing with layer and head, so heads
/// differ) and queries (scale growing with head); values equal keys.
inline veloxquant::Activations synthetic_activations(int layers, int heads, int d, int rows,
                                                     uint64_t seed) {
    veloxquant::Activations a;
    a.layers.resize(layers);
    for (int l = 0; l < layers; ++l)
        for (int h = 0; h < heads; ++h) {
            const float scale = 0.5f + l + 0.7f * h;
            veloxquant::HeadSamples k{
                d, randn(static_cast<std::size_t>(rows) * d, seed + 7 * l + h, scale), {}};
            veloxquant::HeadSamples q{
                d, randn(static_cast<std::size_t>(rows) * d, seed + 100 + 7 * l + h, 1.0f + h), {}};
            for (float& x : k.data) x += 0.3f;
            a.layers[l].keys.push_back(k);
            a.layers[l].values.push_back(k);
            a.layers[l].queries.push_back(q);
        }
    return a;
}

/// c with the calibration its method needs (spectral, commvq, vecinfer) fitted on synthetic
/// activations of one layer of `heads` heads.
inline veloxquant::KVCacheConfig calibrated(veloxquant::KVCacheConfig c, int heads, int d) {
    const veloxquant::Activations acts = synthetic_activations(1, heads, d, 512, c.seed + 11);
    veloxquant::Calibration cal;
    veloxquant::calibrate_method(acts, c, cal);
    veloxquant::apply_calibration(cal, c);
    return c;
}

}  // namespace vqtest
