// warp_sum_rows (warp_reduce.cuh), the reduce-scatter that sums R values a lane over a warp, on
// a GPU: for R = 1, 2, 4, 8, 16 and 32, on fresh random inputs of mixed signs and magnitudes,
// every lane's R sums against the host's sums in double (within a few ulps of the magnitudes
// summed) and the same floats in every lane; and rows of small integers, whose sums must be
// exact (each row's sum in its own place). Skips without a device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/warp_reduce.cuh"
#include "cuda_test_helpers.h"

namespace veloxquant::cuda {
namespace {

using vqtest::DeviceBuffer;

// in [32][R] (lane, value) -> out [32][R]: each lane's sums after warp_sum_rows.
template <int R>
__global__ void sum_rows_kernel(const float* in, float* out) {
    const int lane = threadIdx.x;
    float v[R];
#pragma unroll
    for (int r = 0; r < R; ++r) v[r] = in[lane * R + r];
    warp_sum_rows<R>(v, lane);
#pragma unroll
    for (int r = 0; r < R; ++r) out[lane * R + r] = v[r];
}

template <int R>
std::vector<float> run_sum_rows(const std::vector<float>& in) {
    const DeviceBuffer<float> d_in(in);
    DeviceBuffer<float> d_out(in.size());
    sum_rows_kernel<R><<<1, 32>>>(d_in.get(), d_out.get());
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    return d_out.download();
}

template <int R>
void check_random_rows(uint64_t seed) {
    std::mt19937 gen(static_cast<uint32_t>(seed));
    std::normal_distribution<float> normal;
    std::uniform_real_distribution<float> decade(-3.0f, 3.0f);
    std::vector<float> in(32 * R);
    for (auto& x : in) x = normal(gen) * std::pow(10.0f, decade(gen));
    const std::vector<float> out = run_sum_rows<R>(in);
    for (int r = 0; r < R; ++r) {
        double sum = 0.0, magnitude = 0.0;
        for (int l = 0; l < 32; ++l) sum += in[l * R + r], magnitude += std::fabs(in[l * R + r]);
        // Five rounds of float adds: within a few ulps of the magnitudes summed.
        EXPECT_LE(std::fabs(out[r] - sum), 1e-6 * magnitude)
            << "R " << R << " row " << r << " seed " << seed;
    }
    for (int l = 1; l < 32; ++l)
        ASSERT_EQ(std::memcmp(&out[l * R], &out[0], R * sizeof(float)), 0)
            << "R " << R << ": lane " << l << " differs from lane 0";
}

template <int R>
void check_integer_rows() {
    std::vector<float> in(32 * R);
    for (int l = 0; l < 32; ++l)
        for (int r = 0; r < R; ++r) in[l * R + r] = static_cast<float>((l * 7 + r * 13) % 29 - 14);
    const std::vector<float> out = run_sum_rows<R>(in);
    for (int r = 0; r < R; ++r) {
        float want = 0.0f;
        for (int l = 0; l < 32; ++l) want += in[l * R + r];
        for (int l = 0; l < 32; ++l)
            ASSERT_EQ(out[l * R + r], want) << "R " << R << " row " << r << " lane " << l;
    }
}

TEST(WarpReduceDevice, SumRowsMatchesTheHostForEveryWidth) {
    SKIP_WITHOUT_DEVICE();
    for (uint64_t seed : {1, 2, 3}) {
        check_random_rows<1>(seed);
        check_random_rows<2>(seed);
        check_random_rows<4>(seed);
        check_random_rows<8>(seed);
        check_random_rows<16>(seed);
        check_random_rows<32>(seed);
    }
}

TEST(WarpReduceDevice, SumRowsIsExactOnSmallIntegers) {
    SKIP_WITHOUT_DEVICE();
    check_integer_rows<1>();
    check_integer_rows<4>();
    check_integer_rows<8>();
    check_integer_rows<32>();
}

}  // namespace
}  // namespace veloxquant::cuda
