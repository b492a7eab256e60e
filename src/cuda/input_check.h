// FiniteCheck: the device caches refuse keys or values holding NaN or Inf, as the CPU caches do,
// before anything is encoded (one small kernel and a synchronization of the caller's stream).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace veloxquant::cuda {

class FiniteCheck {
public:
    FiniteCheck() = default;
    ~FiniteCheck();
    FiniteCheck(const FiniteCheck&) = delete;
    FiniteCheck& operator=(const FiniteCheck&) = delete;

    /// Throws std::invalid_argument naming the first NaN or Inf of device keys or values
    /// ([num_heads][n_tokens][head_dim] floats each) by head and token, in the CPU caches'
    /// words. Synchronizes `stream`.
    void require(const float* keys, const float* values, int num_heads, int n_tokens, int head_dim,
                 cudaStream_t stream);

private:
    unsigned long long* first_ = nullptr;  ///< [2] device: first bad index of keys, values
                                           ///< (allocated by the first require)
};

}  // namespace veloxquant::cuda
