// Helpers of the sliding-window device tests (test_cuda_codec_window, test_cuda_turboquant_window):
// a device window against the CPU's SlidingWindowKVCache of the same window and sinks, for either
// device cache (CudaCodecCache, CudaTurboQuantCache).
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <stdexcept>
#include <vector>

#include "cache/paged_store.h"
#include "cuda_test_helpers.h"
#include "veloxquant/caches.h"

namespace vqtest {

/// Every page of [0, size) is held on the device exactly where the CPU's window holds it.
template <class Gpu>
void expect_same_pages_held(const Gpu& gpu, const veloxquant::SlidingWindowKVCache& cpu) {
    constexpr int P = veloxquant::kTokensPerPage;
    ASSERT_EQ(gpu.size(), cpu.size());
    for (int p = 0; p * P < cpu.size(); ++p)
        EXPECT_EQ(gpu.position_held(p * P), cpu.inner().position_held(p * P))
            << "page " << p << " of " << cpu.size() << " tokens";
}

/// Dequantize: the window's last tokens as the CPU's (1e-5), and the first position past the sink
/// pages, evicted on both, refused (std::out_of_range). Returns that position.
template <class Gpu>
int expect_window_dequantize(const Gpu& gpu, const veloxquant::SlidingWindowKVCache& cpu) {
    constexpr int P = veloxquant::kTokensPerPage;
    const int size = gpu.size(), n = cpu.window(), d = gpu.head_dim();
    const std::size_t count = static_cast<std::size_t>(gpu.num_heads()) * n * d;
    std::vector<float> rk(count), rv(count);
    cpu.dequantize(size - n, n, rk.data(), rv.data());
    DeviceBuffer<float> gk(count), gv(count);
    gpu.dequantize(size - n, n, gk.get(), gv.get(), nullptr);
    EXPECT_LE(relative_error(gk.download(), rk), 1e-5);
    EXPECT_LE(relative_error(gv.download(), rv), 1e-5);
    const int evicted = (cpu.sink_tokens() + P - 1) / P * P;
    EXPECT_FALSE(gpu.position_held(evicted));
    EXPECT_FALSE(cpu.inner().position_held(evicted));
    EXPECT_THROW(gpu.dequantize(evicted, 1, gk.get(), gv.get(), nullptr), std::out_of_range);
    return evicted;
}

}  // namespace vqtest
