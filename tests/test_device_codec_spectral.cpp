// spectral's device codec on the host against SpectralCodec: identical codes and scales, decode
// and scores, over head dims, signal/noise widths, MSE and query-aware allocations (0-bit and
// 8-bit directions included), and keys the calibration did not see (at the mean, huge, spiky).
#include <gtest/gtest.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/cpu_isa.h"
#include "device_codec_test_helpers.h"
#include "device_codecs/spectral_device.h"
#include "methods/spectral.h"
#include "methods/turboquant_rvq.h"
#include "spectral_test_helpers.h"
#include "test_helpers.h"

namespace {

using namespace veloxquant;

struct SpectralShape {
    int d, signal_bits, noise_bits;
    bool query_aware;  ///< uneven query moments (else all 1: the MSE allocation)
};

// A calibration of make_law's keys: its basis, spectrum and mean (the ones a calibration on
// many samples would converge to). Query-aware moments weigh three directions 1e5 times more
// than the rest, so the allocation gives them 8 bits while other directions get none.
SpectralBasis law_basis(const spectral_test::Synthetic& law, bool query_aware) {
    const int d = law.d;
    SpectralBasis b;
    b.basis.assign(law.q.begin(), law.q.end());
    b.variances.assign(law.lambda.begin(), law.lambda.end());
    b.mean.assign(law.mu.begin(), law.mu.end());
    for (int r = 0; r < d; ++r)
        b.query_moments.push_back(!query_aware ? 1.0f
                                  : r < 3      ? 1e5f
                                               : 0.01f * static_cast<float>(1 + r % 7));
    return b;
}

// Keys of the law, plus one at the mean (every coordinate 0: no spread search), a zero key, a
// spike on one axis (far from Gaussian in the basis) and two of huge norm.
std::vector<float> test_keys(const spectral_test::Synthetic& law, uint64_t seed) {
    const int d = law.d, n = 40;
    std::vector<float> keys = spectral_test::sample(law, n, seed);
    float* at_mean = keys.data();
    float* zero = keys.data() + d;
    float* spike = keys.data() + 2 * d;
    for (int j = 0; j < d; ++j) {
        at_mean[j] = static_cast<float>(law.mu[j]);
        zero[j] = 0.0f;
    }
    spike[d / 3] += 40.0f;
    for (int j = 0; j < d; ++j) {
        keys[3 * d + j] *= 1e4f;
        keys[4 * d + j] = keys[5 * d + j] * -3e5f;
    }
    return keys;
}

class SpectralDeviceCodec : public testing::TestWithParam<SpectralShape> {};

TEST_P(SpectralDeviceCodec, MatchesCpuCodec) {
    const SpectralShape s = GetParam();
    const spectral_test::Synthetic law = spectral_test::make_law(s.d, 31 + s.d);
    SpectralBasis basis = law_basis(law, s.query_aware);
    const int d_eff = participation_dim(basis.variances.data(), s.d);
    const SpectralCodec cpu(s.d, s.signal_bits, s.noise_bits, std::move(basis), d_eff);
    const auto queries = vqtest::randn(static_cast<std::size_t>(3) * s.d, 5 + s.d);
    // Every kernel set: the CPU encoder projects 16 or more keys through SIMD builds.
    const std::string start = cpu_isa_name();
    for (const std::string& isa : cpu_isas()) {
        SCOPED_TRACE(isa);
        use_cpu_isa(isa);
        vqtest::expect_device_codec_matches<dev::SpectralDevice>(
            cpu, test_keys(law, 17 + s.signal_bits), queries);
    }
    use_cpu_isa(start);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SpectralDeviceCodec,
    testing::Values(SpectralShape{64, 4, 2, false}, SpectralShape{64, 8, 0, false},
                    SpectralShape{64, 3, 1, true}, SpectralShape{128, 5, 3, true},
                    SpectralShape{128, 1, 0, false}, SpectralShape{80, 4, 2, true},
                    SpectralShape{96, 8, 8, false}, SpectralShape{256, 2, 1, true}));

// The query-aware shapes above cover the stream's extremes: dropped directions next to 8-bit
// ones (the three directions the queries weigh most).
TEST(SpectralDeviceCodec, ShapesIncludeZeroAndEightBitDirections) {
    const spectral_test::Synthetic law = spectral_test::make_law(64, 31 + 64);
    SpectralBasis basis = law_basis(law, true);
    const int d_eff = participation_dim(basis.variances.data(), 64);
    const std::vector<int> bits =
        SpectralCodec(64, 3, 1, std::move(basis), d_eff).coordinate_bits();
    EXPECT_EQ(*std::min_element(bits.begin(), bits.end()), 0);
    EXPECT_EQ(*std::max_element(bits.begin(), bits.end()), 8);
}

TEST(SpectralDeviceCodec, RejectsOtherCodecs) {
    TurboQuantRVQCodec other(64, 2, 1, true, 1);
    dev::ParamArena arena;
    EXPECT_THROW(dev::SpectralDevice::build(other, arena), std::invalid_argument);
}

}  // namespace
