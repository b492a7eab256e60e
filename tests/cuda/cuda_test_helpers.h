// Device-side test utilities: device detection (tests skip cleanly without one), a typed device
// buffer, tokens with spread norms, the relative error the parity checks use, and a method's
// config.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "cuda/cuda_cache.h"
#include "test_helpers.h"
#include "veloxquant/config.h"

namespace vqtest {

using veloxquant::cuda::check_cuda;

inline bool has_device() {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

template <typename T>
class DeviceBuffer {
public:
    explicit DeviceBuffer(std::size_t n) : n_(n) {
        check_cuda(cudaMalloc(&ptr_, std::max<std::size_t>(n, 1) * sizeof(T)), "malloc");
    }
    explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
        check_cuda(cudaMemcpy(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), "upload");
    }
    ~DeviceBuffer() { cudaFree(ptr_); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    T* get() const { return ptr_; }
    std::vector<T> download() const {
        std::vector<T> host(n_);
        check_cuda(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost),
                   "download");
        return host;
    }

private:
    T* ptr_ = nullptr;
    std::size_t n_;
};

// [heads][n][d] Gaussian rows with per-token norms spread over 10^[-decades, decades], and one
// zero token.
inline std::vector<float> random_tokens(int heads, int n, int d, uint64_t seed, float decades) {
    std::vector<float> x = vqtest::randn(static_cast<std::size_t>(heads) * n * d, seed);
    std::mt19937_64 gen(seed ^ 0x9e3779b97f4a7c15ull);
    std::uniform_real_distribution<float> spread(-decades, decades);
    for (std::size_t row = 0; row < x.size() / d; ++row) {
        const float s = std::pow(10.0f, spread(gen));
        for (int j = 0; j < d; ++j) x[row * d + j] *= row == 3 ? 0.0f : s;
    }
    return x;
}

inline double relative_error(const std::vector<float>& got, const std::vector<float>& ref) {
    double num = 0.0, den = 0.0;
    for (std::size_t i = 0; i < ref.size(); ++i) {
        if (!std::isfinite(got[i])) return INFINITY;
        num += (static_cast<double>(got[i]) - ref[i]) * (static_cast<double>(got[i]) - ref[i]);
        den += static_cast<double>(ref[i]) * ref[i];
    }
    return std::sqrt(num / std::max(den, 1e-300));
}

inline veloxquant::KVCacheConfig method_config(const std::string& method, int bits, int value_bits,
                                               uint64_t seed) {
    veloxquant::KVCacheConfig c;
    c.method = method;
    c.bits = bits;
    c.value_bits = value_bits;
    c.seed = seed;
    return c;
}

}  // namespace vqtest

#define SKIP_WITHOUT_DEVICE() \
    if (!vqtest::has_device()) GTEST_SKIP() << "no CUDA device"
