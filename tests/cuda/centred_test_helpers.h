// Helpers of the centred-key device tests (test_cuda_center_keys, test_cuda_codec_center_keys):
// a CPU cache's key mean, and how many dequantized tokens differ from the CPU's.
#pragma once

#include <cstddef>
#include <vector>

#include "cuda_test_helpers.h"
#include "methods/centered_key_codec.h"
#include "veloxquant/caches.h"

namespace vqtest {

/// The pre-RoPE key mean [heads][d] of a CPU cache with center_keys.
inline std::vector<float> cpu_key_mean(const veloxquant::QuantizedKVCache& cpu) {
    std::vector<float> mean;
    for (const auto& codec : cpu.key_codecs()) {
        const auto& m = dynamic_cast<const veloxquant::CenteredKeyCodec&>(*codec).mean();
        mean.insert(mean.end(), m.begin(), m.end());
    }
    return mean;
}

/// Tokens (rows of d floats) of got whose relative error against ref exceeds tol. A device
/// centre differs from the CPU's in rounding only, so a code may flip at a tie now and then.
inline int rows_differing(const std::vector<float>& got, const std::vector<float>& ref, int d,
                          double tol = 1e-4) {
    int bad = 0;
    for (std::size_t row = 0; row < ref.size() / d; ++row) {
        const std::vector<float> a(got.begin() + row * d, got.begin() + (row + 1) * d),
            b(ref.begin() + row * d, ref.begin() + (row + 1) * d);
        bad += relative_error(a, b) > tol;
    }
    return bad;
}

}  // namespace vqtest
