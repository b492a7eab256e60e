// rabitq's warp encoder (rabitq_encode.cuh) finds a key's nearest centroid by ||c||^2 - 2 <x, c>
// (rb_nearest_by_dot), which answers only where an error bound proves its answer the CPU's, and
// otherwise by squared_distance itself (rb_nearest). On a GPU, one warp a case, over head dims,
// centroid counts and kinds of input: rb_nearest must equal the host's nearest_centroid always,
// rb_nearest_by_dot must equal it or decline (-1), and decline where two centroids tie (equal
// rows), where a centroid is NaN and where the scores leave float's range; on k-means-like data
// it must mostly answer; subnormal inputs (1e-20 a coordinate) must agree. Skips without a
// device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "core/kmeans.h"
#include "cuda/rabitq_encode.cuh"
#include "cuda_test_helpers.h"

namespace veloxquant::cuda {
namespace {

using vqtest::DeviceBuffer;

// Case blockIdx.x: x (d floats) against `clusters` rows; both searches' answers.
__global__ void nearest_kernel(const float* xs, const float* centroids, int clusters, int d,
                               int* by_dot, int* exact) {
    extern __shared__ __align__(16) float smem[];
    __shared__ float max_norm2;
    const int k = static_cast<int>(blockIdx.x), lane = static_cast<int>(threadIdx.x);
    const int stride = d + codec::kRbRowPad;
    float* x = smem;
    float* rows = smem + d;
    const float* cents = centroids + static_cast<size_t>(k) * clusters * d;
    for (int i = lane; i < clusters * d; i += 32) rows[(i / d) * stride + i % d] = cents[i];
    float x_norm2 = 0.0f;
    for (int j = lane; j < d; j += 32) {
        x[j] = xs[static_cast<size_t>(k) * d + j];
        x_norm2 += x[j] * x[j];
    }
    if (lane == 0) max_norm2 = 0.0f;
    __syncthreads();
    codec::rb_centroid_norms(rows, stride, clusters, d, &max_norm2);
    __syncthreads();
    const int a =
        codec::rb_nearest_by_dot(x, rows, stride, clusters, d, warp_sum(x_norm2), max_norm2, lane);
    const int b = codec::rb_nearest(x, rows, stride, clusters, d, lane);
    if (lane == 0) {
        by_dot[k] = a;
        exact[k] = b;
    }
}

enum class Kind { kClustered, kTied, kNaN, kMidpoint, kHuge, kTiny };

struct Cases {
    std::vector<float> xs, centroids;
    int n = 0;
};

// n cases of `kind`: centroids around which x is drawn (k-means-like), with the kind's twist.
Cases make_cases(Kind kind, int n, int clusters, int d, uint64_t seed) {
    std::mt19937_64 gen(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_int_distribution<int> pick(0, clusters - 1);
    const float scale = kind == Kind::kHuge ? 1e20f : kind == Kind::kTiny ? 1e-20f : 1.0f;
    Cases c;
    c.n = n;
    for (int k = 0; k < n; ++k) {
        std::vector<float> cents(static_cast<size_t>(clusters) * d);
        for (float& v : cents) v = scale * normal(gen) / std::sqrt(static_cast<float>(d));
        const int near = pick(gen), other = (near + 1) % clusters;
        if (kind == Kind::kTied && clusters > 1)  // `other` repeats `near`
            std::copy_n(cents.begin() + static_cast<long>(near) * d, d,
                        cents.begin() + static_cast<long>(other) * d);
        if (kind == Kind::kNaN) cents[static_cast<size_t>(other) * d + d / 2] = std::nanf("");
        for (int j = 0; j < d; ++j) {
            const float base = cents[static_cast<size_t>(near) * d + j];
            float v = base + 0.5f * scale * normal(gen) / std::sqrt(static_cast<float>(d));
            if (kind == Kind::kMidpoint && clusters > 1)
                v = 0.5f * (base + cents[static_cast<size_t>(other) * d + j]);
            if (kind == Kind::kTied) v = base + 0.01f * scale * normal(gen);
            c.xs.push_back(v);
        }
        c.centroids.insert(c.centroids.end(), cents.begin(), cents.end());
    }
    return c;
}

struct Answers {
    std::vector<int> by_dot, exact;
};

Answers run(const Cases& c, int clusters, int d) {
    const DeviceBuffer<float> xs(c.xs), cents(c.centroids);
    DeviceBuffer<int> by_dot(c.n), exact(c.n);
    const size_t smem =
        sizeof(float) * (d + static_cast<size_t>(clusters) * (d + codec::kRbRowPad));
    check_cuda(cudaFuncSetAttribute(nearest_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "nearest kernel shared memory");
    nearest_kernel<<<c.n, 32, smem>>>(xs.get(), cents.get(), clusters, d, by_dot.get(),
                                      exact.get());
    check_cuda(cudaDeviceSynchronize(), "nearest kernel");
    return {by_dot.download(), exact.download()};
}

// Checks both searches of every case against the host; returns the share by_dot answered.
double check(Kind kind, int n, int clusters, int d, uint64_t seed) {
    const Cases c = make_cases(kind, n, clusters, d, seed);
    const Answers got = run(c, clusters, d);
    int answered = 0;
    for (int k = 0; k < n; ++k) {
        const int want = nearest_centroid(
            c.xs.data() + static_cast<size_t>(k) * d,
            c.centroids.data() + static_cast<size_t>(k) * clusters * d, clusters, d);
        EXPECT_EQ(got.exact[k], want) << "case " << k;
        if (got.by_dot[k] >= 0) {
            EXPECT_EQ(got.by_dot[k], want) << "case " << k;
            ++answered;
        }
    }
    return static_cast<double>(answered) / n;
}

struct Shape {
    int d, clusters;
};
constexpr Shape kShapes[] = {{32, 1},   {32, 7},    {64, 33},   {64, 64},
                             {128, 64}, {128, 100}, {128, 256}, {256, 64}};

TEST(RabitqNearestDevice, ClusteredKeysMostlyTakeTheDotProducts) {
    SKIP_WITHOUT_DEVICE();
    for (const Shape s : kShapes) {
        SCOPED_TRACE(testing::Message() << "d " << s.d << " clusters " << s.clusters);
        EXPECT_GE(check(Kind::kClustered, 512, s.clusters, s.d, 7 + s.d + s.clusters), 0.9);
    }
}

TEST(RabitqNearestDevice, MidpointsAndSubnormalsAgreeWithTheHost) {
    SKIP_WITHOUT_DEVICE();
    for (const Shape s : kShapes) {
        SCOPED_TRACE(testing::Message() << "d " << s.d << " clusters " << s.clusters);
        check(Kind::kMidpoint, 256, s.clusters, s.d, 11 + s.d + s.clusters);
        check(Kind::kTiny, 128, s.clusters, s.d, 9 + s.d + s.clusters);
    }
}

TEST(RabitqNearestDevice, TiesNaNsAndHugeScoresDecline) {
    SKIP_WITHOUT_DEVICE();
    for (const Shape s : kShapes) {
        if (s.clusters < 2) continue;
        SCOPED_TRACE(testing::Message() << "d " << s.d << " clusters " << s.clusters);
        EXPECT_EQ(check(Kind::kTied, 128, s.clusters, s.d, 13 + s.d), 0.0);
        EXPECT_EQ(check(Kind::kNaN, 128, s.clusters, s.d, 17 + s.d), 0.0);
        EXPECT_EQ(check(Kind::kHuge, 128, s.clusters, s.d, 19 + s.d), 0.0);
    }
}

}  // namespace
}  // namespace veloxquant::cuda
