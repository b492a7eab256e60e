// The device codecs shared by every method (turboquant_rvq / ratequant keys, values) run on the
// host against their CPU codecs: identical codes, decode and scores.
#include <gtest/gtest.h>

#include <cstring>

#include "device_codec_test_helpers.h"
#include "device_codecs/fp16_device.h"
#include "device_codecs/tq_device.h"
#include "device_codecs/value_device.h"
#include "methods/fp16_codec.h"
#include "methods/turboquant_rvq.h"
#include "methods/value_codec.h"
#include "test_helpers.h"

namespace {

using namespace veloxquant;

struct TqShape {
    int d, bits, stages;
    bool hadamard;
};

class TqDeviceCodec : public testing::TestWithParam<TqShape> {};

TEST_P(TqDeviceCodec, MatchesCpuCodec) {
    const TqShape s = GetParam();
    TurboQuantRVQCodec cpu(s.d, s.bits, s.stages, s.hadamard, 1234 + s.d);
    auto keys = vqtest::randn(static_cast<std::size_t>(64) * s.d, 7 + s.bits, 2.0f);
    std::fill(keys.begin(), keys.begin() + s.d, 0.0f);  // a zero key
    const auto queries = vqtest::randn(static_cast<std::size_t>(3) * s.d, 99);
    vqtest::expect_device_codec_matches<dev::TqDevice>(cpu, keys, queries);
}

INSTANTIATE_TEST_SUITE_P(Shapes, TqDeviceCodec,
                         testing::Values(TqShape{64, 1, 1, true}, TqShape{64, 2, 2, true},
                                         TqShape{128, 4, 1, true}, TqShape{128, 3, 3, true},
                                         TqShape{80, 2, 1, true}, TqShape{96, 4, 2, false},
                                         TqShape{256, 2, 1, true}));

TEST(TqDeviceCodec, RejectsOtherCodecs) {
    TurboQuantRVQCodec big(512, 2, 1, true, 1);
    dev::ParamArena arena;
    EXPECT_THROW(dev::TqDevice::build(big, arena), std::invalid_argument);
}

TEST(Fp16DeviceCodec, MatchesCpuCodec) {
    for (const int d : {64, 96, 128}) {
        FP16Codec cpu(d);
        auto keys = vqtest::randn(static_cast<std::size_t>(40) * d, 3 + d, 4.0f);
        keys[5] = 1e-6f;     // a subnormal half
        keys[6] = 65000.0f;  // near the largest half
        vqtest::expect_device_codec_matches<dev::Fp16Device>(cpu, keys, vqtest::randn(2 * d, 4));
    }
}

class ValueDeviceCodec : public testing::TestWithParam<std::tuple<int, int, bool>> {};

TEST_P(ValueDeviceCodec, MatchesCpuCodec) {
    const auto [d, bits, hadamard] = GetParam();
    ValueCodec cpu(d, bits, hadamard, 77 + d);
    dev::ParamArena arena;
    dev::ValueDevice::Params p = dev::ValueDevice::build(cpu, arena);
    std::vector<uint8_t> blob = arena.bytes();
    p.rebase(blob.data());
    const int n = 64, stride = kTokensPerPage;
    auto values = vqtest::randn(static_cast<std::size_t>(n) * d, 5 + bits, 3.0f);
    std::fill(values.begin(), values.begin() + d, 0.0f);
    const std::size_t cb = cpu.code_bytes();
    ASSERT_EQ(static_cast<std::size_t>(dev::ValueDevice::code_bytes(p)), cb);
    std::vector<uint8_t> a(n * cb), b(n * cb);
    std::vector<float> sa(stride), sb(stride);
    cpu.encode(values.data(), n, a.data(), sa.data(), stride);
    for (int t = 0; t < n; ++t)
        dev::ValueDevice::encode(p, values.data() + t * d, b.data() + t * cb, sb.data() + t);
    EXPECT_EQ(a, b);
    if (bits != 16) EXPECT_EQ(0, std::memcmp(sa.data(), sb.data(), sizeof(float) * n));

    std::vector<float> ra(static_cast<std::size_t>(n) * d), rb(ra.size());
    cpu.decode(a.data(), sa.data(), stride, n, ra.data());
    for (int t = 0; t < n; ++t)
        dev::ValueDevice::decode(p, a.data() + t * cb, sa.data() + t, rb.data() + t * d);
    EXPECT_LT(vqtest::max_rel_error(rb, ra), 1e-5);

    // Accumulate-then-finalize equals the CPU's accumulate + finalize.
    const auto w = vqtest::randn(n, 3);
    std::vector<float> acc_cpu(d, 0.0f), acc_dev(d, 0.0f), out_cpu(d), out_dev(d);
    float* rows[1] = {acc_cpu.data()};
    cpu.accumulate(w.data(), n, 1, a.data(), sa.data(), n, rows);
    cpu.finalize(acc_cpu.data(), out_cpu.data());
    for (int t = 0; t < n; ++t)
        for (int j = 0; j < d; ++j)
            acc_dev[j] += w[t] * dev::ValueDevice::coord(p, a.data() + t * cb, sa.data() + t, j);
    dev::ValueDevice::finalize(p, acc_dev.data(), out_dev.data());
    EXPECT_LT(vqtest::max_rel_error(out_dev, out_cpu), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ValueDeviceCodec,
    testing::Values(std::make_tuple(64, 2, true), std::make_tuple(128, 4, true),
                    std::make_tuple(128, 16, true), std::make_tuple(80, 3, true),
                    std::make_tuple(96, 1, false), std::make_tuple(64, 8, true)));

}  // namespace
