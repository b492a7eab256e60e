// Thin launchers of the turboquant kernels: argument checks, kernel selection by
// (head_dim, key bits, value bits), the split-K plan of the decode, and the launches.
#include <algorithm>

#include "cuda/turboquant_decode.cuh"

namespace veloxquant::cuda {
namespace {

using kernels::DecodeKernelParams;
using kernels::kDecodeWarps;
using kernels::kMaxGroup;

bool layout_supported(const TqPageLayout& L) {
    const bool values = L.value_bits == 1 || L.value_bits == 2 || L.value_bits == 4 || L.value_bits == 16;
    return (L.head_dim == 64 || L.head_dim == 128) && L.key_bits >= 1 && L.key_bits <= 4 &&
           L.key_stages >= 1 && L.key_stages <= kernels::kMaxStages && values && L.num_kv_heads >= 1 &&
           L.head_bytes % 64 == 0 && L.page_bytes == static_cast<uint64_t>(L.num_kv_heads) * L.head_bytes;
}

struct DecodeKernel {
    void (*fn)(DecodeKernelParams) = nullptr;
    size_t shared_bytes = 0;  // sizeof(DecodeShared), before the rings
};

template <int D, int K, int V>
DecodeKernel decode_entry(bool hilo) {
    const size_t shared = sizeof(kernels::DecodeShared<D, K, V>);
    if (hilo) return {&kernels::decode_attention_kernel<D, K, V, true>, shared};
    return {&kernels::decode_attention_kernel<D, K, V, false>, shared};
}

template <int D, int K>
DecodeKernel pick_value_bits(int value_bits, bool hilo) {
    switch (value_bits) {
        case 1: return decode_entry<D, K, 1>(hilo);
        case 2: return decode_entry<D, K, 2>(hilo);
        case 4: return decode_entry<D, K, 4>(hilo);
        case 16: return decode_entry<D, K, 16>(hilo);
        default: return {};
    }
}

template <int D>
DecodeKernel pick_key_bits(int key_bits, int value_bits, bool hilo) {
    switch (key_bits) {
        case 1: return pick_value_bits<D, 1>(value_bits, hilo);
        case 2: return pick_value_bits<D, 2>(value_bits, hilo);
        case 3: return pick_value_bits<D, 3>(value_bits, hilo);
        case 4: return pick_value_bits<D, 4>(value_bits, hilo);
        default: return {};
    }
}

// Groups of up to 4 query heads split each query into fp16 hi + lo columns.
DecodeKernel pick_decode(const TqPageLayout& L, int group) {
    const bool hilo = group <= 4;
    if (L.head_dim == 64) return pick_key_bits<64>(L.key_bits, L.value_bits, hilo);
    if (L.head_dim == 128) return pick_key_bits<128>(L.key_bits, L.value_bits, hilo);
    return {};
}

struct DecodePlan {
    DecodeKernel kernel;
    int ring = 1;
    size_t smem = 0;
    int splits = 1;
    int pages_per_split = 1;
    size_t partial_o_bytes = 0;
    size_t partial_ml_bytes = 0;
};

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// Split-K plan: enough CTAs for about four waves on big problems (the tail wave costs little),
// at most 32 pages per split until the machine is full once, so a CTA's set-up (tables, query
// rotation) is amortized over at least 8 pages per warp when there is work for it.
cudaError_t make_decode_plan(const DecodeArgs& a, DecodePlan& plan) {
    const TqPageLayout& L = a.layout;
    if (!layout_supported(L) || a.group < 1 || a.group > kMaxGroup || a.batch < 1 || a.max_seq_len < 1 ||
        a.pool == nullptr || a.page_table == nullptr || a.queries == nullptr || a.out == nullptr ||
        a.page_table_stride < (a.max_seq_len + kernels::kPage - 1) / kernels::kPage ||
        (a.seq_lens == nullptr && (a.seq_len < 0 || a.seq_len > a.max_seq_len)))
        return cudaErrorInvalidValue;
    plan.kernel = pick_decode(L, a.group);
    int device = 0, sms = 0, major = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err != cudaSuccess) return err;
    if (major < 8) return cudaErrorNotSupported;  // mma.sync m16n8k16 and cp.async

    // Ring depth: 44 KB of rings keeps four CTAs (16 warps) per SM for narrow pages; at least
    // two pages per warp where that still fits, else one.
    constexpr size_t kRingBudget = 44 * 1024, kRingMax = 192 * 1024;
    plan.ring = static_cast<int>(std::clamp<size_t>(kRingBudget / (kDecodeWarps * L.head_bytes), 1, 4));
    if (plan.ring == 1 && 2 * kDecodeWarps * static_cast<size_t>(L.head_bytes) <= kRingMax) plan.ring = 2;
    const size_t rings = static_cast<size_t>(kDecodeWarps) * plan.ring * L.head_bytes;
    const size_t states = (static_cast<size_t>(kDecodeWarps) * kMaxGroup * (L.head_dim + 2)) * sizeof(float);
    plan.smem = kernels::decode_ring_offset(plan.kernel.shared_bytes) + std::max(rings, states);
    err = cudaFuncSetAttribute(plan.kernel.fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(plan.smem));
    int per_sm = 0;
    if (err == cudaSuccess)
        err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, plan.kernel.fn, kDecodeWarps * 32, plan.smem);
    if (err != cudaSuccess) return err;
    const long long resident = static_cast<long long>(std::max(per_sm, 1)) * sms;
    const long long pages = (a.max_seq_len + kernels::kPage - 1) / kernels::kPage;
    const long long units = static_cast<long long>(a.batch) * L.num_kv_heads;
    const long long total = units * pages;
    long long pps = (total + 4 * resident - 1) / (4 * resident);
    if (pps < 32) pps = std::min<long long>(32, std::max(pps, (total + resident - 1) / resident));
    pps = std::clamp<long long>(pps, 1, pages);
    plan.pages_per_split = static_cast<int>(pps);
    plan.splits = static_cast<int>((pages + pps - 1) / pps);
    const size_t partials = static_cast<size_t>(units) * plan.splits * a.group;
    plan.partial_o_bytes = align256(partials * L.head_dim * sizeof(float));
    plan.partial_ml_bytes = align256(partials * sizeof(float2));
    return cudaSuccess;
}

}  // namespace

cudaError_t launch_encode(const EncodeArgs& a, cudaStream_t stream) {
    if (!layout_supported(a.layout) || a.n_tokens < 0 || a.start < 0 || a.pool == nullptr ||
        a.page_table == nullptr || (a.n_tokens > 0 && (a.keys == nullptr || a.values == nullptr)))
        return cudaErrorInvalidValue;
    if (a.n_tokens == 0) return cudaSuccess;
    const long long items = static_cast<long long>(a.layout.num_kv_heads) * a.n_tokens;
    const unsigned blocks = static_cast<unsigned>((items + kernels::kEncodeWarps - 1) / kernels::kEncodeWarps);
    if (a.layout.head_dim == 64) kernels::encode_kernel<64><<<blocks, kernels::kEncodeWarps * 32, 0, stream>>>(a);
    else kernels::encode_kernel<128><<<blocks, kernels::kEncodeWarps * 32, 0, stream>>>(a);
    return cudaGetLastError();
}

cudaError_t launch_dequantize(const DequantizeArgs& a, cudaStream_t stream) {
    if (!layout_supported(a.layout) || a.n_tokens < 0 || a.start < 0 || a.pool == nullptr ||
        a.page_table == nullptr || (a.n_tokens > 0 && (a.keys == nullptr || a.values == nullptr)))
        return cudaErrorInvalidValue;
    if (a.n_tokens == 0) return cudaSuccess;
    const long long items = static_cast<long long>(a.layout.num_kv_heads) * a.n_tokens;
    const unsigned blocks = static_cast<unsigned>((items + kernels::kEncodeWarps - 1) / kernels::kEncodeWarps);
    if (a.layout.head_dim == 64) kernels::dequantize_kernel<64><<<blocks, kernels::kEncodeWarps * 32, 0, stream>>>(a);
    else kernels::dequantize_kernel<128><<<blocks, kernels::kEncodeWarps * 32, 0, stream>>>(a);
    return cudaGetLastError();
}

std::size_t decode_workspace_bytes(const DecodeArgs& a) {
    DecodePlan plan;
    if (make_decode_plan(a, plan) != cudaSuccess) return 0;
    return plan.partial_o_bytes + plan.partial_ml_bytes;
}

cudaError_t launch_decode_attention(const DecodeArgs& a, cudaStream_t stream) {
    DecodePlan plan;
    cudaError_t err = make_decode_plan(a, plan);
    if (err != cudaSuccess) return err;
    if (a.workspace == nullptr) return cudaErrorInvalidValue;
    DecodeKernelParams kp;
    kp.args = a;
    kp.pages_per_split = plan.pages_per_split;
    kp.splits = plan.splits;
    kp.ring = plan.ring;
    kp.partial_o = static_cast<float*>(a.workspace);
    kp.partial_ml = reinterpret_cast<float2*>(static_cast<uint8_t*>(a.workspace) + plan.partial_o_bytes);
    const dim3 grid(plan.splits, a.layout.num_kv_heads, a.batch);
    plan.kernel.fn<<<grid, kDecodeWarps * 32, plan.smem, stream>>>(kp);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    const long long rows = static_cast<long long>(a.batch) * a.layout.num_kv_heads * a.group;
    const unsigned blocks = static_cast<unsigned>((rows + 3) / 4);
    if (a.layout.head_dim == 64) kernels::merge_kernel<64><<<blocks, 128, 0, stream>>>(kp);
    else kernels::merge_kernel<128><<<blocks, 128, 0, stream>>>(kp);
    return cudaGetLastError();
}

}  // namespace veloxquant::cuda
