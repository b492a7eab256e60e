// The qjl device codec runs on the host against QJLCodec: identical sign bits and norms, the
// same reconstruction, and scores from its m-float state equal to the CPU's byte tables.
#include <gtest/gtest.h>

#include <algorithm>
#include <stdexcept>

#include "device_codec_test_helpers.h"
#include "device_codecs/qjl_device.h"
#include "methods/polarquant.h"
#include "methods/qjl.h"
#include "test_helpers.h"

namespace {

using namespace veloxquant;

struct QjlShape {
    int d, sketch_dim;
};

class QjlDeviceCodec : public testing::TestWithParam<QjlShape> {};

TEST_P(QjlDeviceCodec, MatchesCpuCodec) {
    const QjlShape s = GetParam();
    QJLCodec cpu(s.d, s.sketch_dim, 4321 + s.d);
    auto keys = vqtest::randn(static_cast<std::size_t>(48) * s.d, 11 + s.sketch_dim, 2.0f);
    std::fill(keys.begin(), keys.begin() + s.d, 0.0f);  // a zero key
    const auto queries = vqtest::randn(static_cast<std::size_t>(3) * s.d, 98);
    vqtest::expect_device_codec_matches<dev::QjlDevice>(cpu, keys, queries);
    // Large norms on their own, so that their scores do not set the scale of the others' errors.
    const auto large = vqtest::randn(static_cast<std::size_t>(4) * s.d, 5, 1e4f);
    vqtest::expect_device_codec_matches<dev::QjlDevice>(cpu, large, queries);
}

// Sketch sizes that are not a multiple of 8 leave padding bits in the last code byte.
INSTANTIATE_TEST_SUITE_P(Shapes, QjlDeviceCodec,
                         testing::Values(QjlShape{64, 64}, QjlShape{64, 100}, QjlShape{128, 256},
                                         QjlShape{128, 1024}, QjlShape{80, 131}, QjlShape{96, 384},
                                         QjlShape{256, 8192}));

TEST(QjlDeviceCodec, RejectsOtherCodecsAndWideHeads) {
    dev::ParamArena arena;
    PolarQuantCodec polar(64, 2, true, 1);
    EXPECT_THROW(dev::QjlDevice::build(polar, arena), std::invalid_argument);
    QJLCodec wide(512, 64, 1);
    EXPECT_THROW(dev::QjlDevice::build(wide, arena), std::invalid_argument);
}

}  // namespace
