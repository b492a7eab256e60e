// The rabitq device codec runs on the host against RaBitQCodec: identical codes and scalars
// (nearest-centroid and extended-RaBitQ level search included), decode and scores, with trained
// and calibrated centroids, 1- and 2-byte cluster ids, and critical-value ties.
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "device_codec_test_helpers.h"
#include "device_codecs/rabitq_device.h"
#include "methods/rabitq.h"
#include "methods/turboquant_rvq.h"
#include "test_helpers.h"

namespace {

using namespace veloxquant;

struct RaBitQShape {
    int d, bits, clusters;
    bool hadamard;
    bool calibrated;  ///< centroids given to the constructor, else k-means on training keys
};

class RaBitQDeviceCodec : public testing::TestWithParam<RaBitQShape> {};

TEST_P(RaBitQDeviceCodec, MatchesCpuCodec) {
    const RaBitQShape s = GetParam();
    const uint64_t seed = 4321 + s.d + s.bits;
    const auto centroids = vqtest::randn(static_cast<std::size_t>(s.clusters) * s.d, seed, 2.0f);
    RaBitQCodec cpu(s.d, s.bits, s.clusters, s.hadamard, seed,
                    s.calibrated ? centroids.data() : nullptr);
    if (!s.calibrated) {
        const int n_train = 512;
        const auto train = vqtest::randn(static_cast<std::size_t>(n_train) * s.d, seed + 1, 2.0f);
        cpu.train(train.data(), n_train);
    }
    ASSERT_EQ(cpu.trained_clusters(), s.clusters);

    const int n = kTokensPerPage;
    auto keys = vqtest::randn(static_cast<std::size_t>(n) * s.d, seed + 2, 2.0f);
    std::fill(keys.begin(), keys.begin() + s.d, 0.0f);  // zero key
    for (int j = 0; j < s.d; ++j) {
        keys[2 * s.d + j] *= 1e-3f;  // small norm
        if (s.calibrated) {
            keys[3 * s.d + j] = centroids[j];  // on centroid 0: a zero residual
            keys[4 * s.d + j] = centroids[j] + 1e-3f * keys[4 * s.d + j];  // next to it
        }
    }
    const auto queries = vqtest::randn(static_cast<std::size_t>(3) * s.d, seed + 3);
    vqtest::expect_device_codec_matches<dev::RaBitQDevice>(cpu, keys, queries);
    // Large norms in a batch of their own: their scores would swamp the others' tolerance.
    const auto large = vqtest::randn(static_cast<std::size_t>(4) * s.d, seed + 4, 1000.0f);
    vqtest::expect_device_codec_matches<dev::RaBitQDevice>(cpu, large, queries);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RaBitQDeviceCodec,
    testing::Values(RaBitQShape{64, 1, 1, true, false}, RaBitQShape{64, 2, 16, true, false},
                    RaBitQShape{64, 3, 300, true, false}, RaBitQShape{128, 4, 1, true, false},
                    RaBitQShape{128, 1, 8, true, true}, RaBitQShape{128, 2, 260, false, true},
                    RaBitQShape{128, 3, 32, true, false}, RaBitQShape{80, 4, 4, false, false},
                    RaBitQShape{96, 2, 8, false, true}, RaBitQShape{96, 3, 1, false, false},
                    RaBitQShape{64, 8, 4, true, false}, RaBitQShape{256, 4, 16, true, true}));

// Residuals with few distinct magnitudes make many critical values s / |e_j| equal, so the
// level search depends on the CPU's (t, j) tie order. With one centroid at 0 and a Hadamard
// rotation (exact on small integers), the residual is the chosen integer vector itself.
TEST(RaBitQDeviceCodec, CriticalValueTies) {
    const int d = 64, n = kTokensPerPage;
    const std::vector<float> zero_centroid(d, 0.0f);
    for (int bits : {2, 3, 4, 8}) {
        RaBitQCodec cpu(d, bits, 1, true, 99, zero_centroid.data());
        std::vector<float> keys(static_cast<std::size_t>(n) * d), rotated(d);
        for (int t = 0; t < n; ++t) {
            for (int j = 0; j < d; ++j)
                rotated[j] = static_cast<float>((t * 31 + j * 17 + j * j) % 7 - 3);
            float* key = &keys[static_cast<std::size_t>(t) * d];
            cpu.rotation().inverse(rotated.data(), key);
            std::vector<float> back(d);
            cpu.rotation().forward(key, back.data());
            ASSERT_EQ(back, rotated) << "the rotation is not exact on this key";
        }
        const auto queries = vqtest::randn(static_cast<std::size_t>(2) * d, 5 + bits);
        SCOPED_TRACE("bits " + std::to_string(bits));
        vqtest::expect_device_codec_matches<dev::RaBitQDevice>(cpu, keys, queries);
    }
}

void expect_build_rejects(const KeyCodec& cpu, const std::string& needle) {
    dev::ParamArena arena;
    try {
        dev::RaBitQDevice::build(cpu, arena);
        ADD_FAILURE() << "build accepted the codec";
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
}

TEST(RaBitQDeviceCodec, RejectsWhatItCannotRun) {
    expect_build_rejects(TurboQuantRVQCodec(64, 2, 1, true, 1), "not a rabitq codec");
    expect_build_rejects(RaBitQCodec(64, 2, 16, true, 1),
                         "rabitq: train before building the device codec");
    const auto wide = vqtest::randn(512, 2);
    expect_build_rejects(RaBitQCodec(512, 2, 1, true, 1, wide.data()), "head_dim <= 256");
    // 64 + 8200 floats of query state do not fit in shared memory.
    const int many = 8200;
    const auto centroids = vqtest::randn(static_cast<std::size_t>(many) * 64, 3);
    expect_build_rejects(RaBitQCodec(64, 2, many, true, 1, centroids.data()),
                         "head_dim + centroids must be <= 8192");
}

}  // namespace
