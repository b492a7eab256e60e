// The affine query state's probes (affine_state.h) on the device: every head's prepare at q = 0,
// at each unit vector and at the check query, one thread a probe, on the parameters the backend
// has uploaded; the host then reads c and M from them (affine_state_from_probes). The host's
// own probes of 8 rabitq heads at d=128 (64 centroids) took 1.72 ms on the H200's 16-core host,
// a sixth of a first append (cuda_h200_20261206k_batch_joint_training.md); here, that first append
// of 32K tokens is 1.4 ms shorter (cuda_h100_20261206l_device_affine_state.md).
// Compiled with --fmad=false (codec_backend.cu), the device's prepare makes the host's floats,
// so both measurements agree bit for bit (test_cuda_affine_state).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <vector>

#include "cuda/affine_state.h"
#include "cuda/cuda_cache.h"
#include "device_codecs/device_common.h"

namespace veloxquant::cuda {

// grid (probe blocks, heads): thread p of head h runs probe p into
// states[h][p][stride]; checks [heads][d] are the check queries.
template <class Codec>
__global__ void affine_probe_states_kernel(const typename Codec::Params* params, int d, int stride,
                                           const float* checks, float* states) {
    const int h = blockIdx.y, p = blockIdx.x * blockDim.x + threadIdx.x;
    const int probes = d + 2;
    if (p >= probes) return;
    float q[dev::kMaxDim];
    for (int j = 0; j < d; ++j)
        q[j] =
            p == d + 1 ? checks[static_cast<std::size_t>(h) * d + j] : (p == j + 1 ? 1.0f : 0.0f);
    Codec::prepare(params[h], q, states + (static_cast<std::size_t>(h) * probes + p) * stride);
}

/// measure_affine_state with the probes on the device: params is the device array of the heads'
/// parameters (rebased to the device), state_floats each head's Codec::state_floats. Synchronous
/// (the backend's constructor uploads the same way). False also where the device has no room for
/// the probes' states.
template <class Codec>
bool measure_affine_state_on_device(const typename Codec::Params* params,
                                    const std::vector<int>& state_floats, int d, int stride,
                                    std::size_t max_floats_per_head, AffineStateHost& out) {
    const int heads = static_cast<int>(state_floats.size()), probes = affine_probe_count(d);
    const std::vector<float> checks = affine_check_queries(heads, d);
    const std::size_t check_bytes = checks.size() * sizeof(float);
    std::vector<float> states(static_cast<std::size_t>(heads) * probes * stride);
    const std::size_t state_bytes = states.size() * sizeof(float);
    void* scratch = nullptr;
    const cudaError_t alloc = cudaMalloc(&scratch, check_bytes + state_bytes);
    if (alloc == cudaErrorMemoryAllocation) {
        // No room for the probes' heads x (d + 2) states: no affine state, the attention's
        // prepare kernel then computes each query's state.
        (void)cudaGetLastError();
        return false;
    }
    check_cuda(alloc, "cudaMalloc(affine probes)");
    auto* device_checks = static_cast<float*>(scratch);
    auto* device_states = device_checks + checks.size();
    cudaError_t err = cudaMemcpy(device_checks, checks.data(), check_bytes, cudaMemcpyHostToDevice);
    // Entries past a head's state stay zero, as the host's.
    if (err == cudaSuccess) err = cudaMemset(device_states, 0, state_bytes);
    if (err == cudaSuccess) {
        constexpr int kThreads = 64;
        const dim3 grid((probes + kThreads - 1) / kThreads, heads);
        affine_probe_states_kernel<Codec>
            <<<grid, kThreads>>>(params, d, stride, device_checks, device_states);
        err = cudaGetLastError();
    }
    if (err == cudaSuccess)
        err = cudaMemcpy(states.data(), device_states, state_bytes, cudaMemcpyDeviceToHost);
    cudaFree(scratch);
    check_cuda(err, "affine query state probes");
    return affine_state_from_probes(states, state_floats, d, stride, max_floats_per_head, out);
}

}  // namespace veloxquant::cuda
