// Thin launchers of the turboquant encoder and dequantizer: argument checks and kernel
// selection. Long appends take the bulk encoder specialized to the layout's (key bits, value
// bits), so that each width is compiled and scheduled alone; decode steps take one encoder for
// every width.
#include <algorithm>

#include "cuda/runtime_facts.h"
#include "cuda/turboquant_encode.cuh"

namespace veloxquant::cuda {
namespace {

/// Encode and dequantize arguments: a supported layout, a token count, a page table and the
/// buffers; args_valid adds one sequence's pool and first position.
template <typename Args>
bool tokens_valid(const Args& a) {
    return layout_supported(a.layout) && a.n_tokens >= 0 && a.page_table != nullptr &&
           (a.n_tokens == 0 || (a.keys != nullptr && a.values != nullptr));
}

template <typename Args>
bool args_valid(const Args& a) {
    return tokens_valid(a) && a.start >= 0 && a.pool != nullptr;
}

/// An encode's arguments: one sequence's, or a short append's batch, whose pools and starts
/// (device arrays, not read here) stand for `pool` and `start`.
bool encode_args_valid(const EncodeArgs& a) {
    if (a.pools == nullptr && a.starts == nullptr) return a.batch == 1 && args_valid(a);
    return a.pools != nullptr && a.starts != nullptr && a.batch >= 1 &&
           a.n_tokens < kShortAppendTokens && tokens_valid(a);
}

/// Launches encode_kernel<D, G, KB, VB> with as many blocks as fit on the device, or one per
/// step of kTokens items.
template <int D, int G, int KB, int VB>
cudaError_t launch_encode_kernel(const EncodeArgs& a, cudaStream_t stream) {
    void (*kernel)(EncodeArgs) = &kernels::encode_kernel<D, G, KB, VB>;
    int sms = 0, major = 0, per_sm = 0;
    cudaError_t err = device_facts(sms, major);
    if (err == cudaSuccess) err = resident_ctas(kernel, kernels::kEncodeThreads, 0, per_sm);
    if (err != cudaSuccess) return err;
    constexpr int kTokens = kernels::EncodeShape<D, G>::kTokens;
    const long long items = static_cast<long long>(a.batch) * a.layout.num_kv_heads * a.n_tokens;
    const long long steps = (items + kTokens - 1) / kTokens;
    const long long resident = static_cast<long long>(std::max(per_sm, 1)) * sms;
    kernel<<<static_cast<unsigned>(std::min(steps, resident)), kernels::kEncodeThreads, 0,
             stream>>>(a);
    return cudaGetLastError();
}

template <int D, int KB>
cudaError_t launch_bulk_encode(const EncodeArgs& a, cudaStream_t stream) {
    constexpr int G = D / 32;
    switch (a.layout.value_bits) {
        case 1:
            return launch_encode_kernel<D, G, KB, 1>(a, stream);
        case 2:
            return launch_encode_kernel<D, G, KB, 2>(a, stream);
        case 4:
            return launch_encode_kernel<D, G, KB, 4>(a, stream);
        default:
            return launch_encode_kernel<D, G, KB, 16>(a, stream);
    }
}

template <int D>
cudaError_t launch_bulk_encode(const EncodeArgs& a, cudaStream_t stream) {
    switch (a.layout.key_bits) {
        case 1:
            return launch_bulk_encode<D, 1>(a, stream);
        case 2:
            return launch_bulk_encode<D, 2>(a, stream);
        case 3:
            return launch_bulk_encode<D, 3>(a, stream);
        default:
            return launch_bulk_encode<D, 4>(a, stream);
    }
}

}  // namespace

cudaError_t launch_encode(const EncodeArgs& a, cudaStream_t stream) {
    if (!encode_args_valid(a)) return cudaErrorInvalidValue;
    if (a.n_tokens == 0) return cudaSuccess;
    const bool short_append = a.n_tokens < kShortAppendTokens;
    if (a.layout.head_dim == 64)
        return short_append ? launch_encode_kernel<64, 8, 0, 0>(a, stream)
                            : launch_bulk_encode<64>(a, stream);
    return short_append ? launch_encode_kernel<128, 16, 0, 0>(a, stream)
                        : launch_bulk_encode<128>(a, stream);
}

cudaError_t launch_dequantize(const DequantizeArgs& a, cudaStream_t stream) {
    if (!args_valid(a)) return cudaErrorInvalidValue;
    if (a.n_tokens == 0) return cudaSuccess;
    const long long items = static_cast<long long>(a.layout.num_kv_heads) * a.n_tokens;
    const unsigned blocks =
        static_cast<unsigned>((items + kernels::kDequantizeWarps - 1) / kernels::kDequantizeWarps);
    (a.layout.head_dim == 64
         ? &kernels::dequantize_kernel<64>
         : &kernels::dequantize_kernel<128>)<<<blocks, kernels::kDequantizeWarps * 32, 0, stream>>>(
        a);
    return cudaGetLastError();
}

}  // namespace veloxquant::cuda
