// The device codecs shared by every method (turboquant_rvq / ratequant keys, values) run on the
// host against their CPU codecs: identical codes, decode and scores; and the affine form of the
// query state (src/cuda/affine_state.h) against the codecs' own prepare.
#include <gtest/gtest.h>

#include <cstring>

#include "cuda/affine_state.h"
#include "device_codec_test_helpers.h"
#include "device_codecs/fp16_device.h"
#include "device_codecs/polarquant_device.h"
#include "device_codecs/qjl_device.h"
#include "device_codecs/tq_device.h"
#include "device_codecs/value_device.h"
#include "methods/fp16_codec.h"
#include "methods/polarquant.h"
#include "methods/qjl.h"
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
                                         TqShape{256, 2, 1, true}, TqShape{72, 5, 1, false},
                                         TqShape{100, 2, 2, false}));

TEST(FieldReader, ReadsWhatReadFieldReads) {
    // Fields of mixed widths 1..16 from every starting bit, up to the stream's last bit, with
    // the stream at each address mod 4 (the reader takes bytes up to a 4-byte boundary and in
    // the last three bytes, words between), against read_field.
    std::vector<uint8_t> buffer(72);
    uint32_t x = 12345;
    for (auto& b : buffer) b = static_cast<uint8_t>((x = x * 1103515245u + 12345u) >> 16);
    const int bytes = 61;
    for (int shift = 0; shift < 4; ++shift) {
        const uint8_t* stream = buffer.data() + shift;
        for (int start = 0; start < 16; ++start) {
            dev::FieldReader reader(stream, stream + bytes, start);
            for (int bit = start, k = 0;; ++k) {
                const int bits = 1 + (k * 7 + start) % 16;
                if (bit + bits > 8 * bytes) break;
                ASSERT_EQ(reader.next(bits), dev::read_field(stream, bit, bits))
                    << "shift " << shift << " start " << start << " bit " << bit << " width "
                    << bits;
                bit += bits;
            }
        }
    }
}

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
    // A norm under 1 / FLT_MAX (every coordinate subnormal): stored as v = 0, not as NaN.
    for (int j = 0; j < d; ++j) values[d + j] = static_cast<float>(j % 3 - 1) * 3e-40f;
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
    for (int j = 0; j < d; ++j) EXPECT_EQ(ra[d + j], 0.0f) << "subnormal value, coordinate " << j;

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

namespace {

// c + M q from measure_affine_state against the codec's own prepare on random queries.
template <class Dev>
void expect_affine_state_matches(const KeyCodec& cpu, int heads_copies = 2) {
    dev::ParamArena arena;
    std::vector<typename Dev::Params> params;
    for (int h = 0; h < heads_copies; ++h) params.push_back(Dev::build(cpu, arena));
    std::vector<uint8_t> blob = arena.bytes();
    for (auto& p : params) p.rebase(blob.data());
    const int d = cpu.dim(), stride = Dev::state_floats(params[0]);
    cuda::AffineStateHost f;
    ASSERT_TRUE(cuda::measure_affine_state<Dev>(params, d, stride, dev::kMaxAffineFloats, f));
    ASSERT_GT(f.varying, 0);
    std::vector<float> want(stride);
    for (int trial = 0; trial < 3; ++trial) {
        const auto q = vqtest::randn(d, 40 + trial, 2.0f);
        for (int h = 0; h < heads_copies; ++h) {
            Dev::prepare(params[h], q.data(), want.data());
            std::vector<float> got(stride);
            for (int i = 0; i < stride; ++i) {
                double x = f.constant[static_cast<std::size_t>(h) * stride + i];
                const int k = f.row_of[static_cast<std::size_t>(h) * stride + i];
                if (k >= 0)
                    for (int j = 0; j < d; ++j)
                        x += static_cast<double>(
                                 f.matrix[(static_cast<std::size_t>(h) * d + j) * f.varying + k]) *
                             q[j];
                got[i] = static_cast<float>(x);
            }
            EXPECT_LT(vqtest::max_rel_error(got, want), 1e-5) << "head " << h;
        }
    }
}

// A state that is not affine in the query (its squares): the measurement must refuse it.
struct SquaredQuery {
    struct Params {
        int d = 0;
        void rebase(const uint8_t*) {}
    };
    static int state_floats(const Params& p) { return p.d; }
    static void prepare(const Params& p, const float* q, float* state) {
        for (int j = 0; j < p.d; ++j) state[j] = q[j] * q[j];
    }
};

}  // namespace

TEST(AffineQueryState, MatchesPrepareForEveryAffineCodec) {
    expect_affine_state_matches<dev::TqDevice>(TurboQuantRVQCodec(128, 2, 2, true, 5));
    expect_affine_state_matches<dev::TqDevice>(TurboQuantRVQCodec(96, 3, 1, false, 6));
    expect_affine_state_matches<dev::Fp16Device>(FP16Codec(64));
    expect_affine_state_matches<dev::QjlDevice>(QJLCodec(128, 256, 7));
    expect_affine_state_matches<dev::PolarQuantDevice>(PolarQuantCodec(64, 2, true, 8));
}

TEST(AffineQueryState, RefusesAStateThatIsNotAffine) {
    std::vector<SquaredQuery::Params> params(1);
    params[0].d = 16;
    cuda::AffineStateHost f;
    EXPECT_FALSE(cuda::measure_affine_state<SquaredQuery>(params, 16, 16, 65536, f));
}

TEST(AffineQueryState, RefusesAMatrixPastTheLimit) {
    const TurboQuantRVQCodec cpu(128, 2, 1, true, 5);
    dev::ParamArena arena;
    std::vector<dev::TqDevice::Params> params{dev::TqDevice::build(cpu, arena)};
    std::vector<uint8_t> blob = arena.bytes();
    params[0].rebase(blob.data());
    cuda::AffineStateHost f;
    EXPECT_FALSE(cuda::measure_affine_state<dev::TqDevice>(
        params, 128, dev::TqDevice::state_floats(params[0]), 128 * 127, f));
}
