// The affine query state measured with its probes on the device (affine_state_device.cuh, what
// the generic backend runs) against the host's measurement (affine_state.h, which
// test_device_codecs checks against each codec's prepare): the same c, M and row map, bit for
// bit, for every device codec at several head dims, and the same refusal of a state that is not
// affine. Compiled with --fmad=false, as codec_backend.cu is.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "calibration_test_helpers.h"
#include "cuda/affine_state_device.cuh"
#include "cuda_test_helpers.h"
#include "device_codecs/commvq_device.h"
#include "device_codecs/fp16_device.h"
#include "device_codecs/polarquant_device.h"
#include "device_codecs/qjl_device.h"
#include "device_codecs/rabitq_device.h"
#include "device_codecs/spectral_device.h"
#include "device_codecs/tq_device.h"
#include "device_codecs/vecinfer_device.h"
#include "methods/key_codec.h"

namespace {

using namespace veloxquant;

// Head h's parameters on the host (rebased to host_blob) and on the device (an array of them,
// rebased to the uploaded arena).
template <class Dev>
struct ParamsOnBoth {
    std::vector<typename Dev::Params> host;
    std::vector<uint8_t> host_blob;
    std::unique_ptr<vqtest::DeviceBuffer<uint8_t>> arena;
    std::unique_ptr<vqtest::DeviceBuffer<typename Dev::Params>> device;

    explicit ParamsOnBoth(const std::vector<std::unique_ptr<KeyCodec>>& heads) {
        dev::ParamArena a;
        std::vector<typename Dev::Params> raw;
        for (const auto& h : heads) raw.push_back(Dev::build(*h, a));
        host_blob = a.bytes();
        arena = std::make_unique<vqtest::DeviceBuffer<uint8_t>>(host_blob);
        host = raw;
        for (auto& p : host) p.rebase(host_blob.data());
        for (auto& p : raw) p.rebase(arena->get());
        device = std::make_unique<vqtest::DeviceBuffer<typename Dev::Params>>(raw);
    }
};

// The method's config at `heads` heads of d, calibrated where the method needs it.
KVCacheConfig config(const std::string& method, int bits, int heads, int d) {
    KVCacheConfig c = vqtest::method_config(method, bits, 4, 11);
    c.num_clusters = 16;
    c.sketch_dim = 96;
    if (method == "spectral" || method == "commvq" || method == "vecinfer")
        c = vqtest::calibrated(c, heads, d);
    return c;
}

std::vector<std::unique_ptr<KeyCodec>> trained_heads(const KVCacheConfig& c, int heads, int d) {
    std::vector<std::unique_ptr<KeyCodec>> codecs;
    for (int h = 0; h < heads; ++h) codecs.push_back(make_key_codec(c, d, 0, h));
    const int n = 1024;
    const auto keys = vqtest::randn(static_cast<std::size_t>(heads) * n * d, 77 + d, 1.5f);
    if (codecs[0]->needs_training()) train_key_codecs(codecs, keys.data(), n);
    return codecs;
}

template <class Dev>
void expect_device_measurement_matches(const std::string& method, int bits, int heads, int d) {
    SCOPED_TRACE(method + " d=" + std::to_string(d));
    const auto codecs = trained_heads(config(method, bits, heads, d), heads, d);
    const ParamsOnBoth<Dev> params(codecs);
    int stride = 0;
    std::vector<int> state_floats;
    for (const auto& p : params.host) {
        state_floats.push_back(Dev::state_floats(p));
        stride = std::max(stride, state_floats.back());
    }
    stride = (stride + 3) / 4 * 4;  // the backend's rounding: entries past a state stay zero
    cuda::AffineStateHost want, got;
    const bool host_affine =
        cuda::measure_affine_state<Dev>(params.host, d, stride, dev::kMaxAffineFloats, want);
    const bool device_affine = cuda::measure_affine_state_on_device<Dev>(
        params.device->get(), state_floats, d, stride, dev::kMaxAffineFloats, got);
    ASSERT_EQ(device_affine, host_affine);
    if (!host_affine) return;
    EXPECT_EQ(got.varying, want.varying);
    EXPECT_EQ(got.row_of, want.row_of);
    EXPECT_EQ(got.constant, want.constant);  // bit for bit (no NaN in a state)
    EXPECT_EQ(got.matrix, want.matrix);
}

// A state that is not affine in the query (its squares): both measurements must refuse it.
struct SquaredQuery {
    struct Params {
        int d = 0;
    };
    VQ_HD static int state_floats(const Params& p) { return p.d; }
    VQ_HD static void prepare(const Params& p, const float* q, float* state) {
        for (int j = 0; j < p.d; ++j) state[j] = q[j] * q[j];
    }
};

}  // namespace

TEST(AffineStateDevice, MatchesTheHostsMeasurementForEveryCodec) {
    SKIP_WITHOUT_DEVICE();
    for (int d : {64, 128}) {
        expect_device_measurement_matches<dev::TqDevice>("turboquant_rvq", 2, 3, d);
        expect_device_measurement_matches<dev::Fp16Device>("fp16", 16, 2, d);
        expect_device_measurement_matches<dev::QjlDevice>("qjl", 1, 3, d);
        expect_device_measurement_matches<dev::PolarQuantDevice>("polarquant", 3, 3, d);
        expect_device_measurement_matches<dev::RaBitQDevice>("rabitq", 3, 4, d);
        expect_device_measurement_matches<dev::SpectralDevice>("spectral", 4, 2, d);
        expect_device_measurement_matches<dev::CommVQDevice>("commvq", 2, 2, d);
        expect_device_measurement_matches<dev::VecInferDevice>("vecinfer", 2, 2, d);
    }
    expect_device_measurement_matches<dev::TqDevice>("turboquant_rvq", 3, 2, 96);
    expect_device_measurement_matches<dev::RaBitQDevice>("rabitq", 2, 2, 256);
}

TEST(AffineStateDevice, RefusesAStateThatIsNotAffine) {
    SKIP_WITHOUT_DEVICE();
    std::vector<SquaredQuery::Params> params(2);
    for (auto& p : params) p.d = 16;
    vqtest::DeviceBuffer<SquaredQuery::Params> device(params);
    cuda::AffineStateHost f;
    EXPECT_FALSE(cuda::measure_affine_state<SquaredQuery>(params, 16, 16, 65536, f));
    EXPECT_FALSE(cuda::measure_affine_state_on_device<SquaredQuery>(device.get(), {16, 16}, 16, 16,
                                                                    65536, f));
}
