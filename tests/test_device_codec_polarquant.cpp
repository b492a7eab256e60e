// The polarquant device codec runs on the host against PolarQuantCodec: identical angle indices,
// fp16 radii and norms, the same reconstruction, and the same scores.
#include <gtest/gtest.h>

#include <algorithm>
#include <stdexcept>

#include "device_codec_test_helpers.h"
#include "device_codecs/polarquant_device.h"
#include "methods/polarquant.h"
#include "methods/qjl.h"
#include "test_helpers.h"

namespace {

using namespace veloxquant;

struct PolarShape {
    int d, bits;
    bool hadamard;
};

class PolarQuantDeviceCodec : public testing::TestWithParam<PolarShape> {};

TEST_P(PolarQuantDeviceCodec, MatchesCpuCodec) {
    const PolarShape s = GetParam();
    PolarQuantCodec cpu(s.d, s.bits, s.hadamard, 2468 + s.d);
    auto keys = vqtest::randn(static_cast<std::size_t>(48) * s.d, 13 + s.bits, 2.0f);
    std::fill(keys.begin(), keys.begin() + s.d, 0.0f);  // a zero key
    const auto queries = vqtest::randn(static_cast<std::size_t>(3) * s.d, 97);
    vqtest::expect_device_codec_matches<dev::PolarQuantDevice>(cpu, keys, queries);
    // Large norms on their own, so that their scores do not set the scale of the others' errors.
    const auto large = vqtest::randn(static_cast<std::size_t>(4) * s.d, 6, 1e4f);
    vqtest::expect_device_codec_matches<dev::PolarQuantDevice>(cpu, large, queries);
}

// 80 and 96 are not powers of two: the rotation is a dense matrix there.
INSTANTIATE_TEST_SUITE_P(Shapes, PolarQuantDeviceCodec,
                         testing::Values(PolarShape{64, 1, true}, PolarShape{64, 3, true},
                                         PolarShape{128, 2, true}, PolarShape{128, 4, false},
                                         PolarShape{128, 6, true}, PolarShape{80, 2, true},
                                         PolarShape{96, 5, true}, PolarShape{256, 3, true}));

TEST(PolarQuantDeviceCodec, RejectsOtherCodecsAndWideHeads) {
    dev::ParamArena arena;
    QJLCodec qjl(64, 128, 1);
    EXPECT_THROW(dev::PolarQuantDevice::build(qjl, arena), std::invalid_argument);
    PolarQuantCodec wide(512, 2, true, 1);
    EXPECT_THROW(dev::PolarQuantDevice::build(wide, arena), std::invalid_argument);
}

}  // namespace
