// Warp-wide reductions shared by the CUDA kernels (every lane gets the result).
#pragma once

#include <cuda_runtime.h>

namespace veloxquant::cuda {

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, m));
    return x;
}

}  // namespace veloxquant::cuda
