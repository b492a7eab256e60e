#include "cuda/input_check.h"

#include <algorithm>

#include "cache/token_check.h"
#include "cuda/cuda_cache.h"

namespace veloxquant::cuda {
namespace {

constexpr unsigned long long kNone = ~0ull;

// first[w] = the smallest index i of array w (keys, values) whose |x| is not under its bound
// (NaN compares false, so it counts; an infinite bound lets every finite value through).
__global__ void find_bad(const float* keys, const float* values, size_t count, float key_bound,
                         float value_bound, unsigned long long* first) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count;
         i += size_t(gridDim.x) * blockDim.x) {
        if (!(fabsf(keys[i]) < key_bound)) atomicMin(&first[0], static_cast<unsigned long long>(i));
        if (!(fabsf(values[i]) < value_bound))
            atomicMin(&first[1], static_cast<unsigned long long>(i));
    }
}

}  // namespace

InputCheck::~InputCheck() {
    cudaFree(first_);
}

void InputCheck::require(const float* keys, const float* values, int num_heads, int n_tokens,
                         int head_dim, float key_bound, float value_bound, cudaStream_t stream,
                         int sequences) {
    const size_t count = static_cast<size_t>(sequences) * num_heads * n_tokens * head_dim;
    if (count == 0) return;
    if (first_ == nullptr)  // on first use: constructing a cache validates before touching CUDA
        check_cuda(cudaMalloc(&first_, 2 * sizeof(unsigned long long)), "cudaMalloc(input check)");
    check_cuda(cudaMemsetAsync(first_, 0xff, 2 * sizeof(unsigned long long), stream),
               "input check");
    const unsigned blocks = static_cast<unsigned>(std::min<size_t>((count + 1023) / 1024, 1024));
    find_bad<<<blocks, 256, 0, stream>>>(keys, values, count, key_bound, value_bound, first_);
    check_cuda(cudaGetLastError(), "input check kernel");
    unsigned long long first[2];
    check_cuda(cudaMemcpyAsync(first, first_, sizeof first, cudaMemcpyDeviceToHost, stream),
               "input check");
    check_cuda(cudaStreamSynchronize(stream), "input check");
    for (const bool is_keys : {true, false}) {
        const unsigned long long i = first[is_keys ? 0 : 1];
        if (i == kNone) continue;
        float value = 0.0f;  // the error path only: which kind of bad it is
        check_cuda(
            cudaMemcpy(&value, (is_keys ? keys : values) + i, sizeof value, cudaMemcpyDeviceToHost),
            "input check");
        throw bad_token_error(is_keys, value, static_cast<size_t>(i), n_tokens, head_dim,
                              sequences > 1 ? num_heads : 0);
    }
}

}  // namespace veloxquant::cuda
