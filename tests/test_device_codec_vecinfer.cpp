// The vecinfer device codec (src/device_codecs/vecinfer_device.h) on the host against
// VecInferCodec: identical codes, decode and scores, in both per-query state forms (the LUT
// [S][C] when its affine form fits kMaxAffineFloats, else the transformed query [d]).
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "calibration/vecinfer_calibration.h"
#include "calibration_test_helpers.h"
#include "core/cpu_isa.h"
#include "core/rng.h"
#include "device_codec_test_helpers.h"
#include "device_codecs/vecinfer_device.h"
#include "methods/turboquant_rvq.h"
#include "methods/vecinfer.h"
#include "test_helpers.h"
#include "veloxquant/factory.h"

namespace {

using namespace veloxquant;

bool takes_lut_state(const KeyCodec& codec) {
    dev::ParamArena arena;
    return dev::VecInferDevice::build(codec, arena).lut_state != 0;
}

/// 64 keys that span the codebook (N(0, 1) times lambda, so R (k / lambda) is N(0, 1)), with a
/// zero key first and two keys of norm ~1e3 * ||lambda|| after it.
std::vector<float> test_keys(const std::vector<float>& smooth, uint64_t seed) {
    const int d = static_cast<int>(smooth.size()), n = 64;
    std::vector<float> keys = vqtest::randn(static_cast<std::size_t>(n) * d, seed);
    for (int t = 0; t < n; ++t)
        for (int j = 0; j < d; ++j) {
            const float scale = t == 0 ? 0.0f : (t <= 2 ? 1e3f : 1.0f);
            keys[t * d + j] *= scale * smooth[j];
        }
    return keys;
}

struct Geometry {
    int d, S, C;
    bool lut_state;  ///< S * C * d <= kMaxAffineFloats
};

class VecInferDeviceCodec : public testing::TestWithParam<Geometry> {};

TEST_P(VecInferDeviceCodec, MatchesCpuCodec) {
    const Geometry g = GetParam();
    Rng rng(derive_seed(21, g.d, g.S, g.C, RandomPurpose::kTest));
    const std::vector<float> codebook =
        vqtest::gaussian(rng, static_cast<std::size_t>(g.d) * g.C, 0.6);
    std::vector<float> smooth(g.d);
    for (float& s : smooth) s = static_cast<float>(0.3 + 2.0 * rng.uniform());
    VecInferCodec cpu(g.d, g.S, g.C, codebook.data(), smooth.data(), vecinfer_rotation(g.d, 1, 0));
    EXPECT_EQ(takes_lut_state(cpu), g.lut_state);
    const auto queries = vqtest::randn(static_cast<std::size_t>(3) * g.d, 99);
    // Every CPU kernel set: the encoder's codeword search has an AVX2 build.
    const std::string start = cpu_isa_name();
    for (const std::string& isa : cpu_isas()) {
        SCOPED_TRACE(isa);
        use_cpu_isa(isa);
        vqtest::expect_device_codec_matches<dev::VecInferDevice>(cpu, test_keys(smooth, 7 + g.C),
                                                                 queries);
    }
    use_cpu_isa(start);
}

INSTANTIATE_TEST_SUITE_P(
    Geometries, VecInferDeviceCodec,
    testing::Values(Geometry{64, 8, 256, false},    // 1 bit/coord, byte indices
                    Geometry{64, 32, 64, false},    // 3 bits/coord, 6-bit indices
                    Geometry{64, 16, 2048, false},  // 11-bit indices that span three bytes
                    Geometry{64, 16, 4096, false},  // 12-bit indices (the MLX geometry)
                    Geometry{128, 32, 256, false},  // 2 bits/coord
                    Geometry{128, 64, 256, false},  // 4 bits/coord
                    Geometry{128, 128, 2, true},    // 1-bit indices: a LUT of 256 entries
                    Geometry{64, 16, 8, true},      // one block of eight codewords
                    Geometry{96, 24, 16, true},     // dense rotation (d not a power of two)
                    Geometry{80, 16, 32, true}),    // 5-bit indices, dense rotation
    [](const testing::TestParamInfo<Geometry>& info) {
        const Geometry& g = info.param;
        return "d" + std::to_string(g.d) + "_S" + std::to_string(g.S) + "_C" + std::to_string(g.C);
    });

// Codecs made by the factory from a calibration (trained codebooks, query-balanced smoothing):
// at 2 and 4 bits/coordinate, d = 128, both take the query state.
TEST(VecInferDeviceCodec, MatchesCalibratedCodecs) {
    const int d = 128;
    const Activations acts = vqtest::synthetic_activations(1, 1, d, 600, 5);
    for (const int bits : {2, 4}) {
        SCOPED_TRACE("bits " + std::to_string(bits));
        const VecInferCalibration cal = calibrate_vecinfer(acts, bits, 11);
        KVCacheConfig config;
        config.method = "vecinfer";
        config.bits = bits;
        config.codebook = cal.codebook;
        config.smooth_factors = cal.smooth_factors;
        const auto cpu = make_key_codec(config, d, 0, 0);
        EXPECT_FALSE(takes_lut_state(*cpu));
        std::vector<float> keys = vqtest::randn(static_cast<std::size_t>(64) * d, 3, 1.5f);
        for (float& x : keys) x += 0.3f;  // the calibration keys' offset
        const auto queries = vqtest::randn(static_cast<std::size_t>(3) * d, 8, 2.0f);
        vqtest::expect_device_codec_matches<dev::VecInferDevice>(*cpu, keys, queries);
    }
}

TEST(VecInferDeviceCodec, RejectsOtherCodecsAndWideHeads) {
    dev::ParamArena arena;
    TurboQuantRVQCodec tq(64, 2, 1, true, 1);
    EXPECT_THROW(dev::VecInferDevice::build(tq, arena), std::invalid_argument);
    const int d = 512;
    const std::vector<float> codebook(static_cast<std::size_t>(d) * 2, 0.5f), smooth(d, 1.0f);
    VecInferCodec wide(d, d, 2, codebook.data(), smooth.data(), vecinfer_rotation(d, 0, 0));
    EXPECT_THROW(dev::VecInferDevice::build(wide, arena), std::invalid_argument);
}

}  // namespace
