#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda/cuda_cache.h"
#include "cuda/input_check.h"

namespace veloxquant::cuda {
namespace {

constexpr unsigned long long kNone = ~0ull;

// first[w] = the smallest index i of array w (keys, values) with a NaN or Inf.
__global__ void find_nonfinite(const float* keys, const float* values, size_t count,
                               unsigned long long* first) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count;
         i += size_t(gridDim.x) * blockDim.x) {
        if (!isfinite(keys[i])) atomicMin(&first[0], static_cast<unsigned long long>(i));
        if (!isfinite(values[i])) atomicMin(&first[1], static_cast<unsigned long long>(i));
    }
}

}  // namespace

FiniteCheck::~FiniteCheck() {
    cudaFree(first_);
}

void FiniteCheck::require(const float* keys, const float* values, int num_heads, int n_tokens,
                          int head_dim, cudaStream_t stream) {
    const size_t count = static_cast<size_t>(num_heads) * n_tokens * head_dim;
    if (count == 0) return;
    if (first_ == nullptr)  // on first use: constructing a cache validates before touching CUDA
        check_cuda(cudaMalloc(&first_, 2 * sizeof(unsigned long long)), "cudaMalloc(finite check)");
    check_cuda(cudaMemsetAsync(first_, 0xff, 2 * sizeof(unsigned long long), stream),
               "finite check");
    const unsigned blocks = static_cast<unsigned>(std::min<size_t>((count + 1023) / 1024, 1024));
    find_nonfinite<<<blocks, 256, 0, stream>>>(keys, values, count, first_);
    check_cuda(cudaGetLastError(), "finite check kernel");
    unsigned long long first[2];
    check_cuda(cudaMemcpyAsync(first, first_, sizeof first, cudaMemcpyDeviceToHost, stream),
               "finite check");
    check_cuda(cudaStreamSynchronize(stream), "finite check");
    for (int which = 0; which < 2; ++which) {
        if (first[which] == kNone) continue;
        const size_t per_head = static_cast<size_t>(n_tokens) * head_dim;
        throw std::invalid_argument(std::string("append: ") + (which == 0 ? "keys" : "values") +
                                    " contain NaN or Inf (head " +
                                    std::to_string(first[which] / per_head) + ", token " +
                                    std::to_string(first[which] % per_head / head_dim) + ")");
    }
}

}  // namespace veloxquant::cuda
