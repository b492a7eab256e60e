// Shared by the CUDA benchmarks: seeded Gaussian fills on the device and event timing.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "cuda/cuda_cache.h"

namespace vqbench {

using veloxquant::cuda::check_cuda;

__global__ void fill_normal(float* x, size_t n, uint64_t seed) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
         i += size_t(gridDim.x) * blockDim.x) {
        uint64_t h = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
        h ^= h >> 31, h *= 0xBF58476D1CE4E5B9ull, h ^= h >> 27, h *= 0x94D049BB133111EBull,
            h ^= h >> 33;
        const float u1 = ((h >> 40) + 1) * (1.0f / 16777217.0f),
                    u2 = (h & 0xFFFFFF) * (1.0f / 16777216.0f);
        x[i] = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
    }
}

inline void fill(float* x, size_t n, uint64_t seed) {
    fill_normal<<<1024, 256>>>(x, n, seed);
    check_cuda(cudaGetLastError(), "fill_normal");
}

// Sorted event times of reps calls of body on the legacy default stream (which the body uses).
template <typename F>
std::vector<float> time_ms(int reps, F&& body) {
    std::vector<cudaEvent_t> ev(2 * reps);
    for (auto& e : ev) check_cuda(cudaEventCreate(&e), "event");
    for (int r = 0; r < reps; ++r) {
        check_cuda(cudaEventRecord(ev[2 * r]), "record");
        body(r);
        check_cuda(cudaEventRecord(ev[2 * r + 1]), "record");
    }
    check_cuda(cudaDeviceSynchronize(), "sync");
    std::vector<float> ms(reps);
    for (int r = 0; r < reps; ++r)
        check_cuda(cudaEventElapsedTime(&ms[r], ev[2 * r], ev[2 * r + 1]), "elapsed");
    for (auto& e : ev) cudaEventDestroy(e);
    std::sort(ms.begin(), ms.end());
    return ms;
}

__device__ double clock_probe_mhz;

// clock64 cycles of one SM over globaltimer nanoseconds of a 200 us spin.
__global__ void clock_probe() {
    uint64_t t0, t1;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    const long long c0 = clock64();
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
    } while (t1 - t0 < 200000);
    clock_probe_mhz = 1e3 * double(clock64() - c0) / double(t1 - t0);
}

// The SM clock (MHz) just after the work queued before it: read right after a timed loop, it is
// the clock that the power management had left the SMs (a sustained sweep hits the SW power cap
// that short runs do not).
inline double sm_clock_mhz() {
    clock_probe<<<1, 1>>>();
    check_cuda(cudaGetLastError(), "clock_probe");
    double mhz = 0.0;
    check_cuda(cudaMemcpyFromSymbol(&mhz, clock_probe_mhz, sizeof(mhz)), "clock_probe");
    return mhz;
}

// Pacing: sleeps in 20 ms steps until the SM clock is back within 2% of full_mhz or max_ms have
// passed, and returns the milliseconds rested. Heavy points run into the GPU's power cap (the
// clock falls within tens of milliseconds), and a point timed right after them would start at the
// clock they left; after a rest it starts where SDPA's points (paced alike) start.
inline double rest_until_clock(double full_mhz, int max_ms) {
    check_cuda(cudaDeviceSynchronize(), "rest");
    const auto start = std::chrono::steady_clock::now();
    auto rested = [&] {
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
            .count();
    };
    while (rested() < max_ms && sm_clock_mhz() < 0.98 * full_mhz)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    return rested();
}

inline float median(const std::vector<float>& sorted) {
    return sorted[sorted.size() / 2];
}

}  // namespace vqbench
