// Bad input on the device caches (CudaCodecCache, CudaTurboQuantCache): configs out of the
// device path's scope are refused at construction; NaN, Inf and (for fp16 storage) magnitudes fp16
// cannot hold are refused with an error naming the first bad token, at any alignment, and the
// cache keeps what it held. Skips without a device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>

#include "cuda/codec_cache.h"
#include "cuda/cuda_cache.h"
#include "cuda_test_helpers.h"
#include "veloxquant/observer.h"

namespace veloxquant::cuda {
namespace {

using vqtest::DeviceBuffer;
using vqtest::method_config;
using vqtest::random_tokens;

TEST(CodecCache, RejectsConfigsOutOfScope) {
    KVCacheConfig c = method_config("turboquant_rvq", 2, 4, 1);
    EXPECT_THROW(CudaCodecCache(c, 2, 512, 64), std::invalid_argument);
    c.outlier_observer = std::make_shared<KeyNormObserver>(4.0, 16);
    c.outlier_bits = 4;  // the side store keeps int8 or fp16
    EXPECT_THROW(CudaCodecCache(c, 2, 128, 64), std::invalid_argument);
}

// f() throws std::invalid_argument whose message contains `fragment`.
template <typename F>
void expect_invalid_argument(F f, const std::string& fragment) {
    try {
        f();
        ADD_FAILURE() << "no error, expected one mentioning '" << fragment << "'";
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
}

// The device centre takes heads up to 128 wide (test_cuda_codec_center_keys checks the rest of
// centred keys on the generic kernels); the refusal comes before any device call.
TEST(CodecCache, RefusesCenteredKeysOnWiderHeads) {
    KVCacheConfig c = method_config("turboquant_rvq", 2, 4, 1);
    c.center_keys = true;
    expect_invalid_argument([&] { CudaCodecCache(c, 2, 256, 64); }, "at most 128");
    expect_invalid_argument([&] { CudaCodecCache(c, 2, 63, 64); }, "even");
}

TEST(CodecCache, RefusesNaNAndInfAndKeepsItsContents) {
    SKIP_WITHOUT_DEVICE();
    const int H = 2, d = 64, n = 10;
    CudaCodecCache gpu(method_config("turboquant_rvq", 2, 4, 1), H, d, 256);
    CudaTurboQuantCache tq(method_config("turboquant_rvq", 2, 4, 1), H, d, 256);
    auto good = random_tokens(H, n, d, 3, 0.5f);
    DeviceBuffer<float> dgood(good);
    gpu.append(dgood.get(), dgood.get(), n, nullptr);
    tq.append(dgood.get(), dgood.get(), n, nullptr);
    for (const float bad : {NAN, INFINITY}) {
        auto keys = good;
        keys[static_cast<std::size_t>(1) * n * d + 7 * d + 5] = bad;  // head 1, token 7
        DeviceBuffer<float> dbad(keys);
        expect_invalid_argument([&] { gpu.append(dbad.get(), dgood.get(), n, nullptr); },
                                "keys contain NaN or Inf (head 1, token 7)");
        EXPECT_THROW(gpu.append(dgood.get(), dbad.get(), n, nullptr), std::invalid_argument);
        EXPECT_THROW(tq.append(dbad.get(), dgood.get(), n, nullptr), std::invalid_argument);
    }
    EXPECT_EQ(gpu.size(), n);
    EXPECT_EQ(tq.size(), n);
}

// The input check reads four floats a load where both arrays are 16-byte aligned, else one: either
// way the error names the first bad coordinate's token (two bad keys, two bad values here), the
// cache keeps its contents, and it takes the same tokens once they are good.
TEST(CodecCache, InputCheckNamesTheFirstBadTokenAtAnyAlignment) {
    SKIP_WITHOUT_DEVICE();
    const int H = 2, d = 64, n = 10;
    const auto at = [&](int head, int token, int j) {
        return static_cast<std::size_t>(head) * n * d + static_cast<std::size_t>(token) * d + j;
    };
    for (const int offset : {0, 1}) {  // floats: 1 misaligns both arrays
        SCOPED_TRACE(offset);
        auto good = random_tokens(H, n + 1, d, 11 + offset, 0.5f);  // room for the offset
        auto keys = good, values = good;
        keys[offset + at(1, 9, 0)] = NAN;
        keys[offset + at(1, 7, 63)] = INFINITY;
        values[offset + at(1, 2, 2)] = -INFINITY;
        values[offset + at(0, 3, 1)] = NAN;
        DeviceBuffer<float> dgood(good), dkeys(keys), dvalues(values);
        CudaCodecCache cache(method_config("turboquant_rvq", 2, 4, 1), H, d, 256);
        cache.append(dgood.get() + offset, dgood.get() + offset, n, nullptr);
        expect_invalid_argument(
            [&] { cache.append(dkeys.get() + offset, dgood.get() + offset, n, nullptr); },
            "keys contain NaN or Inf (head 1, token 7)");
        expect_invalid_argument(
            [&] { cache.append(dgood.get() + offset, dvalues.get() + offset, n, nullptr); },
            "values contain NaN or Inf (head 0, token 3)");
        EXPECT_EQ(cache.size(), n);
        cache.append(dgood.get() + offset, dgood.get() + offset, n, nullptr);
        EXPECT_EQ(cache.size(), 2 * n);
    }
}

// As the CPU caches (InputRange.Fp16StorageRefusesWhatItCannotHold): fp16 storage refuses
// magnitudes of 65520 and more, a quantized value codec takes them.
TEST(CodecCache, Fp16StorageRefusesWhatItCannotHold) {
    SKIP_WITHOUT_DEVICE();
    const int H = 2, d = 64, n = 10;
    auto good = random_tokens(H, n, d, 5, 0.5f), big = good;
    big[static_cast<std::size_t>(1) * n * d + 7 * d + 5] = 7e4f;  // head 1, token 7
    DeviceBuffer<float> dgood(good), dbig(big);
    CudaCodecCache fp16(method_config("fp16", 2, 16, 1), H, d, 256);
    expect_invalid_argument([&] { fp16.append(dbig.get(), dgood.get(), n, nullptr); },
                            "keys exceed fp16's range, |x| < 65520 (head 1, token 7)");
    EXPECT_EQ(fp16.size(), 0);
    CudaTurboQuantCache tq16(method_config("turboquant_rvq", 2, 16, 1), H, d, 256);
    EXPECT_THROW(tq16.append(dgood.get(), dbig.get(), n, nullptr), std::invalid_argument);
    tq16.append(dbig.get(), dgood.get(), n, nullptr);  // turboquant keys take any finite value
    CudaTurboQuantCache tq4(method_config("turboquant_rvq", 2, 4, 1), H, d, 256);
    tq4.append(dgood.get(), dbig.get(), n, nullptr);
    EXPECT_EQ(tq16.size(), n);
    EXPECT_EQ(tq4.size(), n);
}

}  // namespace
}  // namespace veloxquant::cuda
