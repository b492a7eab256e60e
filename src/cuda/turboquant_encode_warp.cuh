// The turboquant_rvq encoder for short appends (decode steps): one warp per (head, token), so a
// token's norm, rotation, codebook search and packing are spread over 32 lanes and a one-token
// append costs a few microseconds. (encode_kernel in turboquant_kernels.cuh, one thread per
// token over 32-token tiles, has the throughput for prefills but the latency of one thread's
// serial work per token: 49 us for one token of 8 heads at d=128 in a decode step, measured on
// the H200 through transformers.) Codes are the CPU's, up to exact ties of the norm: the lanes'
// double partial sums are added in a butterfly, not in the CPU's order.
#pragma once

#include "cuda/turboquant_kernels.cuh"

namespace veloxquant::cuda::kernels {

/// Index of the nearest centroid: the number of (ascending) boundaries below x, as the CPU's
/// binary searches return (ties go to the lower cell).
__device__ __forceinline__ int quantize_index(const float* boundaries, int levels, float x) {
    int idx = 0;
    for (int i = 0; i < levels - 1; ++i) idx += boundaries[i] < x ? 1 : 0;
    return idx;
}

/// Packs each lane's E indices (bits each) into `words` (a warp's scratch of nwords words) and
/// stores them at dst (4-byte aligned, nwords * 4 bytes): the stream of pack_bits.
template <int E>
__device__ __forceinline__ void warp_pack_store(const int (&idx)[E], int bits, uint32_t* words,
                                                int nwords, uint8_t* dst, int lane) {
    for (int w = lane; w < nwords; w += 32) words[w] = 0;
    __syncwarp();
    uint32_t v = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) v |= static_cast<uint32_t>(idx[e]) << (e * bits);
    const int bit = lane * E * bits;
    const uint64_t shifted = static_cast<uint64_t>(v) << (bit & 31);
    atomicOr(&words[bit >> 5], static_cast<uint32_t>(shifted));
    if ((shifted >> 32) != 0)
        atomicOr(&words[(bit >> 5) + 1], static_cast<uint32_t>(shifted >> 32));
    __syncwarp();
    for (int w = lane; w < nwords; w += 32) reinterpret_cast<uint32_t*>(dst)[w] = words[w];
    __syncwarp();
}

// ---------------------------------------------------------------------------------------------
template <int D>
__global__ void __launch_bounds__(kEncodeWarps * 32) encode_warp_kernel(const EncodeArgs a) {
    constexpr int E = D / 32;
    // Packing scratch of one stage: at most 128 coordinates of 4 bits.
    __shared__ uint32_t scratch[kEncodeWarps][16];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int item = blockIdx.x * kEncodeWarps + warp;
    if (item >= a.layout.num_kv_heads * a.n_tokens) return;
    const TqPageLayout& L = a.layout;
    const TqDeviceTables& T = a.tables;
    const int h = item / a.n_tokens, t = item % a.n_tokens, pos = a.start + t;
    uint8_t* block = head_block(a.pool, a.page_table, L, pos, h);
    const int slot = pos % kPage;
    const size_t src = (static_cast<size_t>(h) * a.n_tokens + t) * D + lane * E;
    const float* ksign = T.key_signs + h * D + lane * E;
    const float* vsign = T.value_signs + h * D + lane * E;

    // Keys: n = ||k|| (double, as the CPU), u = R k / n, then each stage quantizes the residual.
    float x[E];
    double sq = 0.0;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        x[e] = a.keys[src + e];
        sq += static_cast<double>(x[e]) * x[e];
    }
    const float norm = static_cast<float>(sqrt(warp_sum(sq)));
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = __fmul_rn(x[e], ksign[e]);
    warp_fwht<E>(x, lane, T.inv_sqrt_d);
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = norm > 0.0f ? __fdiv_rn(x[e], norm) : 0.0f;
    const int levels = 1 << L.key_bits;
    int idx[E];
    for (int s = 0; s < L.key_stages; ++s) {
        const float* c = T.key_centroids + s * levels;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            idx[e] = quantize_index(T.key_boundaries + s * (levels - 1), levels, x[e]);
            x[e] = __fsub_rn(x[e], c[idx[e]]);
        }
        warp_pack_store<E>(idx, L.key_bits, scratch[warp], L.key_stage_bytes / 4,
                           block + slot * L.key_code_bytes + s * L.key_stage_bytes, lane);
    }
    if (lane == 0) reinterpret_cast<float*>(block + L.key_norms_offset)[slot] = norm;

    // Values: fp16, or R v / ||v|| quantized with one least-squares scale per token.
    uint8_t* vcode = block + L.value_codes_offset + slot * L.value_code_bytes;
    sq = 0.0;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        x[e] = a.values[src + e];
        sq += static_cast<double>(x[e]) * x[e];
    }
    if (L.value_bits == 16) {
#pragma unroll
        for (int e = 0; e < E; ++e)
            reinterpret_cast<__half*>(vcode)[lane * E + e] = __float2half_rn(x[e]);
        return;
    }
    const double vnorm = sqrt(warp_sum(sq));
    const int vlevels = 1 << L.value_bits;
    float scale = 0.0f;
    if (vnorm > 0.0) {
#pragma unroll
        for (int e = 0; e < E; ++e) x[e] = __fmul_rn(x[e], vsign[e]);
        warp_fwht<E>(x, lane, T.inv_sqrt_d);
        const float inv = static_cast<float>(1.0 / vnorm);
        double uc = 0.0, cc = 0.0;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const float u = __fmul_rn(x[e], inv);
            idx[e] = quantize_index(T.value_boundaries, vlevels, u);
            const double c = T.value_centroids[idx[e]];
            uc += static_cast<double>(u) * c;
            cc += c * c;
        }
        uc = warp_sum(uc);
        cc = warp_sum(cc);
        scale = cc > 0.0 ? static_cast<float>(vnorm * uc / cc) : 0.0f;
    } else {
#pragma unroll
        for (int e = 0; e < E; ++e) idx[e] = 0;
    }
    warp_pack_store<E>(idx, L.value_bits, scratch[warp], L.value_code_bytes / 4, vcode, lane);
    if (lane == 0) reinterpret_cast<float*>(block + L.value_scales_offset)[slot] = scale;
}

}  // namespace veloxquant::cuda::kernels
