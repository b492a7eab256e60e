// On a GPU with the instructions: the forms ptx_wrappers.cuh takes on older GPUs (two m16n8k8
// on sm_75; before that the portable mma and ldmatrix of mma_portable.h) against the tensor
// cores' mma.m16n8k16 and ldmatrix.x4 (.trans) on fresh random fragments: ldmatrix bit for bit,
// the mma within 1e-6 of its scale (only the order of the float sums may differ). Skips without
// a device.
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cuda/ptx_wrappers.cuh"
#include "cuda_test_helpers.h"

namespace veloxquant::cuda {
namespace {

using vqtest::DeviceBuffer;

constexpr int kStride = 24;  // halves a tile row (an odd multiple of 8, as the kernels')

// One warp: frag [32][6] (A registers 0-3, B 4-5), acc [32][4]; tile [16][kStride] halves.
// Out: mma [3][32][4] (m16n8k16, two m16n8k8, portable), ld [2 forms][2 ways][32][4].
__global__ void compare_kernel(const uint32_t* frag, const float* acc, const uint16_t* tile,
                               float* mma_out, uint32_t* ld_out) {
    __shared__ __align__(16) uint16_t s[16 * kStride];
    const int lane = threadIdx.x;
    for (int i = lane; i < 16 * kStride; i += 32) s[i] = tile[i];
    __syncwarp();
    uint32_t a[4];
    for (int r = 0; r < 4; ++r) a[r] = frag[lane * 6 + r];
    const uint32_t b0 = frag[lane * 6 + 4], b1 = frag[lane * 6 + 5];
    float hw[4], k8[4], sw[4];
    for (int i = 0; i < 4; ++i) hw[i] = k8[i] = sw[i] = acc[lane * 4 + i];
    mma_16816(hw, a, b0, b1);
    mma_16816_as_two_1688(k8, a, b0, b1);
    mma_16816_by_lanes(sw, lane, [&](int r, int j) {
        return __shfl_sync(0xffffffffu, r < 4 ? a[r] : r == 4 ? b0 : b1, j);
    });
    for (int i = 0; i < 4; ++i) {
        mma_out[lane * 4 + i] = hw[i];
        mma_out[128 + lane * 4 + i] = k8[i];
        mma_out[256 + lane * 4 + i] = sw[i];
    }
    // The kernels' addresses: the scores' A (codec_feature_scores.cuh) and the values' A^T
    // (codec_value_mma.cuh).
    const uint16_t* plain = s + ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
    const uint16_t* trans = s + ((lane & 7) + ((lane >> 4) << 3)) * kStride + ((lane >> 3) & 1) * 8;
    uint32_t r[4][4];
    ldmatrix_x4<false>(r[0], plain);
    ldmatrix_x4_by_lanes<false>(r[1], lane, [plain](int j) {
        return reinterpret_cast<const uint16_t*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(plain), j));
    });
    ldmatrix_x4<true>(r[2], trans);
    ldmatrix_x4_by_lanes<true>(r[3], lane, [trans](int j) {
        return reinterpret_cast<const uint16_t*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(trans), j));
    });
    for (int w = 0; w < 4; ++w)
        for (int i = 0; i < 4; ++i) ld_out[(w * 32 + lane) * 4 + i] = r[w][i];
}

std::vector<uint16_t> random_halves(std::size_t n, std::mt19937& rng) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<uint16_t> h(n);
    for (auto& x : h) x = __half_as_ushort(__float2half_rn(normal(rng)));
    return h;
}

TEST(MmaPortableDevice, MatchesTheTensorCores) {
    SKIP_WITHOUT_DEVICE();
    int major = 0;
    check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "major");
    if (major < 8) GTEST_SKIP() << "the hardware forms need sm_80";
    for (uint32_t seed : {1u, 2u, 3u, 4u}) {
        std::mt19937 rng(seed);
        const auto halves = random_halves(32 * 6 * 2, rng);
        std::vector<uint32_t> frag(32 * 6);
        for (std::size_t i = 0; i < frag.size(); ++i)
            frag[i] = halves[2 * i] | static_cast<uint32_t>(halves[2 * i + 1]) << 16;
        std::normal_distribution<float> normal(0.0f, 4.0f);
        std::vector<float> acc(32 * 4);
        for (float& x : acc) x = normal(rng);
        const auto tile = random_halves(16 * kStride, rng);
        DeviceBuffer<uint32_t> dfrag(frag), dld(4 * 32 * 4);
        DeviceBuffer<float> dacc(acc), dmma(3 * 32 * 4);
        DeviceBuffer<uint16_t> dtile(tile);
        compare_kernel<<<1, 32>>>(dfrag.get(), dacc.get(), dtile.get(), dmma.get(), dld.get());
        check_cuda(cudaDeviceSynchronize(), "compare kernel");
        const auto mma = dmma.download();
        const auto ld = dld.download();
        for (int form = 1; form <= 2; ++form) {  // two m16n8k8, portable
            double worst = 0.0, scale = 0.0;
            for (int i = 0; i < 128; ++i) {
                worst =
                    std::max(worst, std::abs(static_cast<double>(mma[i]) - mma[128 * form + i]));
                scale = std::max(scale, std::abs(static_cast<double>(mma[i])));
            }
            EXPECT_LE(worst, 1e-6 * scale) << "form " << form << ", seed " << seed;
        }
        for (int i = 0; i < 128; ++i) {
            EXPECT_EQ(ld[i], ld[128 + i]) << "ldmatrix, seed " << seed << ", entry " << i;
            EXPECT_EQ(ld[256 + i], ld[384 + i]) << "ldmatrix.trans, seed " << seed << ", " << i;
        }
    }
}

}  // namespace
}  // namespace veloxquant::cuda
