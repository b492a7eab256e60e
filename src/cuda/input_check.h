// InputCheck: the device caches refuse keys or values holding NaN or Inf, or magnitudes their
// fp16 storage cannot hold, as the CPU caches do (cache/token_check.h), before anything is
// encoded (one small kernel and a synchronization of the caller's stream).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace veloxquant::cuda {

class InputCheck {
public:
    InputCheck() = default;
    ~InputCheck();
    InputCheck(const InputCheck&) = delete;
    InputCheck& operator=(const InputCheck&) = delete;

    /// Throws std::invalid_argument naming the first bad coordinate of device keys or values
    /// ([num_heads][n_tokens][head_dim] floats each) by head and token, in the CPU caches'
    /// words: NaN, Inf, or a magnitude not under key_bound / value_bound
    /// (KVCacheConfig::key_bound, value_bound). Synchronizes `stream`. With sequences > 1 the
    /// arrays are [sequences][num_heads][n_tokens][head_dim] and errors name the sequence.
    void require(const float* keys, const float* values, int num_heads, int n_tokens, int head_dim,
                 float key_bound, float value_bound, cudaStream_t stream, int sequences = 1);

private:
    unsigned long long* first_ = nullptr;  ///< [2] device: first bad index of keys, values
                                           ///< (allocated by the first require)
};

}  // namespace veloxquant::cuda
