// vecinfer's keys of a long append: a CTA of kViTokens tokens of one unit, one thread per token.
// VecInferDevice::encode (one thread per token) rotates its key into a local array and reads
// every subspace's codebook from global memory, which at 2 bits and d = 128 (32 subspaces x 256
// codewords x 4 floats, 128 KB) does not stay in L1. Here the rotated keys lie in shared memory
// (coordinate-major, so the lanes' tokens fall on distinct banks), each subspace's codebook and
// half norms are staged once for the CTA, and every lane scans the same codeword at the same time
// (a broadcast read) against its own sub-vector, held in registers.
//
// Bit for bit the CPU's codes (VecInferCodec::encode, via VecInferDevice): the rotation is the
// device codec's own (dev::rotate_forward's operations: (k * 1/lambda) * sign, then fwht), and
// each codeword's value -||c||^2/2 + x_0 c_0 + x_1 c_1 + ... is summed in the same float order
// (this file compiles with --fmad=false), the first maximum kept (strictly greater).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bulk_key_encode.h"
#include "cuda/codec_kernels.cuh"
#include "cuda/cuda_cache.h"
#include "device_codecs/vecinfer_device.h"

namespace veloxquant::cuda::codec {

constexpr int kViTokens = 128;  // tokens (threads) per CTA
constexpr int kViStride =
    kViTokens + 1;  // floats per staged coordinate: lanes' rows on distinct banks

/// Dynamic shared memory of vecinfer_encode_keys_kernel: the rotated keys [d][kViStride], one
/// subspace's codebook [C][sub] and half norms [C], and the codes [code words][kViTokens].
/// Floats of the staged keys, rounded up to 16 bytes (the codebook after them is read as float4).
__host__ __device__ constexpr int vecinfer_key_floats(int d) {
    return (d * kViStride + 3) / 4 * 4;
}

inline size_t vecinfer_encode_smem_bytes(const dev::VecInferDevice::Params& p) {
    const size_t code_words = (dev::VecInferDevice::code_bytes(p) + 3) / 4;
    return sizeof(float) *
           (static_cast<size_t>(vecinfer_key_floats(p.d)) +
            static_cast<size_t>(p.codewords) * (p.sub_dim + 1) + code_words * kViTokens);
}

/// Grid (token tiles of kViTokens, units); SUB = the codec's sub_dim.
template <int SUB>
__global__ void __launch_bounds__(kViTokens, 3)
    vecinfer_encode_keys_kernel(const EncodeParams<dev::VecInferDevice> a) {
    extern __shared__ __align__(16) float vi_smem[];
    const int u = static_cast<int>(blockIdx.y), first = static_cast<int>(blockIdx.x) * kViTokens;
    const int tokens = min(kViTokens, a.n - first), t = static_cast<int>(threadIdx.x);
    const dev::VecInferDevice::Params& p = a.key_params(u);
    const int d = p.d, C = p.codewords, S = p.subspaces, bits = p.code_bits;
    const int code_words = (dev::VecInferDevice::code_bytes(p) + 3) / 4;
    float* x = vi_smem;                                  // [d][kViStride]
    float* words = x + vecinfer_key_floats(d);           // [C][SUB], 16-byte aligned
    float* half = words + C * SUB;                       // [C]
    auto* code = reinterpret_cast<uint32_t*>(half + C);  // [code_words][kViTokens]
    // The CTA's keys, coalesced along each row, then each thread's token rotated in place.
    const float* src = a.keys + (static_cast<size_t>(u) * a.n + first) * d;
    for (int i = t; i < tokens * d; i += kViTokens) {
        const int token = i / d, j = i % d;
        x[j * kViStride + token] = (src[i] * p.inv_smooth[j]) * p.rotation.signs[j];
    }
    for (int w = 0; w < code_words; ++w) code[w * kViTokens + t] = 0;
    __syncthreads();
    float* mine = x + t;  // coordinate j at mine[j * kViStride]
    if (t < tokens) {     // fwht: butterflies of length 1, 2, 4, ..., then 1 / sqrt(d)
        for (int len = 1; len < d; len <<= 1)
            for (int i = 0; i < d; i += len << 1)
                for (int j = i; j < i + len; ++j) {
                    const float lo = mine[j * kViStride], hi = mine[(j + len) * kViStride];
                    mine[j * kViStride] = lo + hi;
                    mine[(j + len) * kViStride] = lo - hi;
                }
        const float scale = 1.0f / sqrtf(static_cast<float>(d));
        for (int j = 0; j < d; ++j) mine[j * kViStride] *= scale;
    }
    const float* book = p.codebook;
    for (int s = 0; s < S; ++s) {
        __syncthreads();  // the previous subspace's scans are done
        for (int i = t; i < C * SUB; i += kViTokens)
            words[i] = book[static_cast<size_t>(s) * C * SUB + i];
        for (int i = t; i < C; i += kViTokens) half[i] = p.half_norm2[s * C + i];
        __syncthreads();
        if (t >= tokens) continue;
        float xs[SUB];
#pragma unroll
        for (int j = 0; j < SUB; ++j) xs[j] = mine[(s * SUB + j) * kViStride];
        float best_v = -INFINITY;
        int best = 0;
        // Four codewords a step, read as SUB + 1 16-byte words: their values are independent
        // (each summed in its own order), and the four tests then run in index order.
        for (int c = 0; c < C; c += 4) {
            float w4[4 * SUB];
#pragma unroll
            for (int q = 0; q < SUB; ++q) {
                const float4 f = reinterpret_cast<const float4*>(words + c * SUB)[q];
                w4[4 * q] = f.x;
                w4[4 * q + 1] = f.y;
                w4[4 * q + 2] = f.z;
                w4[4 * q + 3] = f.w;
            }
            const float4 h = *reinterpret_cast<const float4*>(half + c);
            float v[4] = {-h.x, -h.y, -h.z, -h.w};
#pragma unroll
            for (int j = 0; j < SUB; ++j)
#pragma unroll
                for (int g = 0; g < 4; ++g) v[g] += xs[j] * w4[g * SUB + j];
#pragma unroll
            for (int g = 0; g < 4; ++g)
                if (v[g] > best_v) {
                    best_v = v[g];
                    best = c + g;
                }
        }
        const int bit = s * bits, w = bit >> 5, shift = bit & 31;
        code[w * kViTokens + t] |= static_cast<uint32_t>(best) << shift;
        if (shift + bits > 32)
            code[(w + 1) * kViTokens + t] |= static_cast<uint32_t>(best) >> (32 - shift);
    }
    __syncthreads();
    // Every code byte of the CTA's tokens, a token's bytes on consecutive threads.
    const HeadRegions R = a.store.regions[a.head(u)];
    const int bytes = static_cast<int>(R.key_code_bytes);
    for (int i = t; i < tokens * bytes; i += kViTokens) {
        const int token = i / bytes, b = i % bytes;
        const int pos = a.pos(u, first + token);
        a.page(u, pos)[R.key_codes + (pos % kPage) * bytes + b] =
            static_cast<uint8_t>(code[(b >> 2) * kViTokens + token] >> (8 * (b & 3)));
    }
}

template <>
struct BulkKeyEncoder<dev::VecInferDevice> {
    static constexpr bool kAvailable = true;
    /// A Hadamard rotation (power-of-two d), sub-vectors of 1, 2, 4 or 8 coordinates and a
    /// multiple of 4 codewords (read four at a time).
    static bool usable(const dev::VecInferDevice::Params& p, size_t smem_optin) {
        const int sub = p.sub_dim;
        return p.rotation.hadamard && (sub == 1 || sub == 2 || sub == 4 || sub == 8) &&
               p.codewords % 4 == 0 && vecinfer_encode_smem_bytes(p) <= smem_optin;
    }
    static const void* kernel(const dev::VecInferDevice::Params& p) {
        switch (p.sub_dim) {
            case 1:
                return reinterpret_cast<const void*>(&vecinfer_encode_keys_kernel<1>);
            case 2:
                return reinterpret_cast<const void*>(&vecinfer_encode_keys_kernel<2>);
            case 4:
                return reinterpret_cast<const void*>(&vecinfer_encode_keys_kernel<4>);
            default:
                return reinterpret_cast<const void*>(&vecinfer_encode_keys_kernel<8>);
        }
    }
    static void launch(const EncodeParams<dev::VecInferDevice>& a,
                       const dev::VecInferDevice::Params& any_head, int, cudaStream_t stream) {
        const int smem = static_cast<int>(vecinfer_encode_smem_bytes(any_head));
        const void* k = kernel(any_head);
        check_cuda(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
                   "vecinfer encode shared memory");
        const dim3 grid(static_cast<unsigned>((a.n + kViTokens - 1) / kViTokens),
                        static_cast<unsigned>(a.units));
        void* args[] = {const_cast<EncodeParams<dev::VecInferDevice>*>(&a)};
        check_cuda(cudaLaunchKernel(k, grid, dim3(kViTokens), args, smem, stream),
                   "vecinfer key encode kernel");
    }
};

}  // namespace veloxquant::cuda::codec
