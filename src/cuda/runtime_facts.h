// What launch plans ask the CUDA runtime, memoized per device and kernel: a decode step plans
// twice (workspace size, launch) and asks for up to three kernels' residency, an append asks
// for its encoders', and each attribute call or occupancy query costs microseconds on the host
// side of every step. (A cudaDeviceReset drops the shared-memory limit that resident_ctas
// remembers as raised; a later launch above 48 KB then fails with the error it returns. Nothing
// in this library resets a device.)
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace veloxquant::cuda {

/// SMs and compute capability major of the current device.
cudaError_t device_facts(int& sms, int& major);

/// The current device's shared memory a block may opt in to: 227 KB on sm_90, 163 on sm_80, 99
/// on sm_86 and sm_89, 96 on sm_70, 64 on sm_75.
cudaError_t shared_memory_optin(std::size_t& bytes);

/// CTAs per SM of `kernel` with `threads` threads and `smem` bytes of dynamic shared memory on
/// the current device, after raising its dynamic shared memory limit there to at least `smem`
/// where that is above the default 48 KB.
cudaError_t resident_ctas(const void* kernel, int threads, std::size_t smem, int& per_sm);

/// Whether kernel's code on the current device waits for a prerequisite grid
/// (kernel_waits_for_prerequisite, programmatic_launch.h).
cudaError_t waits_for_prerequisite(const void* kernel, bool& waits);

template <class... Params>
cudaError_t resident_ctas(void (*kernel)(Params...), int threads, std::size_t smem, int& per_sm) {
    return resident_ctas(reinterpret_cast<const void*>(kernel), threads, smem, per_sm);
}

template <class... Params>
cudaError_t waits_for_prerequisite(void (*kernel)(Params...), bool& waits) {
    return waits_for_prerequisite(reinterpret_cast<const void*>(kernel), waits);
}

}  // namespace veloxquant::cuda
