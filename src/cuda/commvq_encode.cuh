// commvq's keys of a long append: a CTA holds up to kCvqTokens tokens of one unit, one thread per
// token, and walks the groups. For each (group, stage) step of the search it stages that stage's
// codebook slice (C codewords of group_dim floats, and their squared norms) in shared memory once
// for all its tokens, and every lane scans the same codeword at the same time (a broadcast read)
// against its own residual, held in registers at group_dim 8 (calibration's 4 pairs) and in a
// shared-memory row per token otherwise. CommVQDevice::encode (one thread per token) reads the
// codebooks (256 KB per head at 2 bits, d = 128) from global memory for every token.
// At group_dim 8 on sm_80 and later a kernel of its own searches on tensor cores instead
// (commvq_nearest_tensor, commvq_search.cuh: the same indices), with the slice's mma fragments
// staged beside it: one append of 32K tokens x 8 heads (2 bits, d = 128; keys and values) on
// the H200 4.82-4.86 -> 3.33-3.36 ms (bench/results/cuda_h200_20261203z_commvq_tensor_search.txt).
// Shared memory: one pool carved per unit's parameters into the tokens' stage indices
// [stages][tokens], the tensor search's warp rows, bounds and fragments, the tokens' codes
// [tokens][stage_stride(code bytes)] where they fit (else each thread builds its code in its
// page), the residual rows (other group_dims; the tokens then go in passes of as many as fit) and
// the codebook chunk: the largest power-of-two number of codewords that fits, the whole slice at
// group_dim 8 (a larger slice takes several chunks).
//
// Bit for bit CommVQDevice::encode (so the CPU's CommVQCodec): each token runs the same steps in
// the same order in one thread: the pairs un-rotated by phase(), the greedy stages, then the ICM
// sweep, with r -= w and r += old coordinate by coordinate, and every distance
// v = norms2[c] + (-2 x_0) w_0 + (-2 x_1) w_1 + ... summed in j order (-2.0f * x[j], the same
// float each time, is taken once per scan). The codewords are scanned in index order, a chunk
// continuing the scan's (m, best), with scan_nearest's rule (split at the first taken codeword:
// from there on its equality test is false), and nearest's n - 1 where none is taken. Indices go
// into a zeroed code by or_bits. Only where a value is read from differs; the tensor search
// computes the codec's v only for the codewords that can hold the least (the proof is in
// commvq_search.cuh), and picks the same index. Files that include this header must compile
// with --fmad=false (no contraction), as the device codecs.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/bulk_key_encode.h"
#include "cuda/codec_kernels.cuh"
#include "cuda/commvq_search.cuh"
#include "cuda/cuda_cache.h"
#include "device_codecs/commvq_device.h"

namespace veloxquant::cuda::codec {

constexpr int kCvqTokens = 128;  // most tokens (threads) per CTA
// The shared-memory pools: the lane scans' (ten CTAs an SM), the tensor search's (eight CTAs
// fill an H100/H200 SM's 228 KB, 1 KB each reserved).
constexpr int kCvqPoolBytes = 20480;
constexpr int kCvqTensorPoolBytes = 28160;
constexpr int kCvqRegisterGroupDim = kCvqTensorDim;  // group_dim whose residual is in registers
__host__ __device__ constexpr int cvq_align16(int bytes) {
    return (bytes + 15) / 16 * 16;
}

constexpr int kCvqBoundBytes = cvq_align16(4 * (1 + kCvqTensorDim));  // a slice's bounds

/// Pool bytes before the codes: the stage indices, and for the tensor search its warps' rows,
/// the slice's bounds and its fragments.
__host__ __device__ constexpr int cvq_head_bytes(int stages, int codewords, int nt, bool tensor) {
    return cvq_align16(stages * nt) + (tensor ? nt / 32 * static_cast<int>(sizeof(CvqWarpRows)) +
                                                    kCvqBoundBytes + cvq_fragment_bytes(codewords)
                                              : 0);
}

/// Pool bytes of a whole slice of C codewords of gd floats and their norms.
__host__ __device__ constexpr int cvq_slice_bytes(int codewords, int gd) {
    return 4 * ((codewords + 3) / 4 * 4 + codewords * gd);
}

// Calibration's default (2 stages of 256 codewords, group_dim 8): at d = 128 and 2 bits the
// 32-byte codes of a full CTA stay staged beside the tensor search's slice.
static_assert(cvq_head_bytes(2, 256, kCvqTokens, true) + 32 * kCvqTokens +
                      cvq_slice_bytes(256, kCvqTensorDim) <=
                  kCvqTensorPoolBytes,
              "the tensor search's pool holds 2-bit d = 128 codes");

/// Whether a CTA of nt tokens can search p's slices on tensor cores (group_dim 8, whole slices
/// of a multiple of 8 codewords beside the scratch, in the pool).
__host__ __device__ inline bool cvq_tensor_search_fits(const dev::CommVQDevice::Params& p, int nt) {
    return p.group_dim == kCvqTensorDim && p.codewords % 8 == 0 &&
           cvq_head_bytes(p.stages, p.codewords, nt, true) +
                   cvq_slice_bytes(p.codewords, kCvqTensorDim) <=
               kCvqTensorPoolBytes;
}

/// The CTA's tokens first .. first + tokens - 1 of unit u (GD as commvq_scan; TENSOR: GD = 8,
/// cvq_tensor_search_fits).
template <int GD, bool TENSOR>
__device__ __forceinline__ void commvq_encode_tile(const EncodeParams<dev::CommVQDevice>& a,
                                                   const dev::CommVQDevice::Params& p, int u,
                                                   int first, int tokens, uint8_t* pool) {
    static_assert(!TENSOR || GD == kCvqTensorDim, "the tensor search takes group_dim 8");
    constexpr int kPool = TENSOR ? kCvqTensorPoolBytes : kCvqPoolBytes;
    const int nt = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
    const int S = p.stages, G = p.groups, C = p.codewords, gd = GD > 0 ? GD : p.group_dim;
    // Staged codes: an odd number of words a token (lanes or_bits into 32 banks), but whole
    // words under the tensor search, whose pool holds 2 bits of 2-bit d = 128 codes no more.
    const int bytes = dev::CommVQDevice::code_bytes(p);
    const int stride = TENSOR ? (bytes + 3) / 4 * 4 : stage_stride(bytes);
    const int steps = S + (S > 1 ? dev::CommVQDevice::kEncodeSweeps * S : 0);
    uint8_t* idx = pool;  // idx[st * nt + thread]
    int used = cvq_head_bytes(S, C, nt, TENSOR);
    // TENSOR: the warps' rows after the indices, then the bounds and the fragments.
    auto* rows_of_warp = reinterpret_cast<CvqWarpRows*>(pool + cvq_align16(S * nt));
    auto* bound = reinterpret_cast<float*>(rows_of_warp + nt / 32);
    auto* frag = reinterpret_cast<uint2*>(pool + used - (TENSOR ? cvq_fragment_bytes(C) : 0));
    const bool staged_codes = TENSOR ? used + stride * nt + cvq_slice_bytes(C, gd) <= kPool
                                     : used + stride * nt <= kPool / 2;
    uint8_t* codes = pool + used;  // [tokens][stride], where staged
    if (staged_codes) used += stride * nt;
    float* rows = reinterpret_cast<float*>(pool + cvq_align16(used));  // [tokens][gd + 1]
    const int per_pass = GD > 0 ? nt : min(nt, (kPool - cvq_align16(used)) / 2 / (4 * (gd + 1)));
    if (GD == 0) used = cvq_align16(used) + per_pass * (gd + 1) * 4;
    used = cvq_align16(used);
    int cc = C;  // codewords per chunk: a power of two >= 2 (C is one), so chunks are full
    while (cc > 2 && 4 * ((cc + 3) / 4 * 4 + cc * gd) > kPool - used) cc /= 2;
    float* norms = reinterpret_cast<float*>(pool + used);
    float* chunk = norms + (cc + 3) / 4 * 4;
    const HeadRegions R = a.store.regions[a.head(u)];
    if (staged_codes) {
        for (int i = tid; i < stride * nt / 4; i += nt) reinterpret_cast<uint32_t*>(codes)[i] = 0;
    }
    for (int t0 = 0; t0 < tokens; t0 += per_pass) {
        const int t = t0 + tid;
        const bool active = tid < per_pass && t < tokens;
        const int pos = a.pos(u, first + t);
        const float* key = a.keys + (static_cast<size_t>(u) * a.n + first + t) * a.store.d;
        uint8_t* code = codes + t * stride;
        if (active && !staged_codes) {
            code = a.page(u, pos) + R.key_codes + (pos % kPage) * R.key_code_bytes;
            dev::zero_bytes(code, bytes);
        }
        float reg[GD > 0 ? GD : 1] = {};
        float* r = GD > 0 ? reg : rows + tid * (gd + 1);
        for (int g = 0; g < G; ++g) {
            if (active) {
                const float* k = key + g * gd;
#pragma unroll
                for (int j = 0; j < gd; ++j) r[j] = k[j];
#pragma unroll
                for (int j = 0; j < gd; j += 2) {
                    const int i = (g * gd + j) / 2;
                    if (i >= p.pairs) break;
                    float c, s;
                    dev::CommVQDevice::phase(p, pos, i, &c, &s);
                    r[j] = k[j] * c + k[j + 1] * s;
                    r[j + 1] = k[j + 1] * c - k[j] * s;
                }
            }
            for (int step = 0; step < steps; ++step) {  // greedy stages, then the ICM sweep
                const int st = step % S;
                const float* slice = p.words + (st * G + g) * C * gd;
                const float* slice_norms = p.norms2 + (st * G + g) * C;
                const float* words = cc == C ? chunk : slice;  // codeword i at words + i * gd
                float m = INFINITY;
                int best = -1;
                for (int c0 = 0; c0 < C; c0 += cc) {
                    __syncthreads();         // the previous chunk's reads are done
                    if constexpr (TENSOR) {  // cc == C
                        cvq_stage_tensor_slice(slice, slice_norms,
                                               p.bounds + (st * G + g) * (1 + gd), C, chunk, norms,
                                               frag, bound, tid, nt);
                    } else {
                        const auto* src = reinterpret_cast<const float4*>(slice + c0 * gd);
                        for (int i = tid; i < cc * gd / 4; i += nt)
                            reinterpret_cast<float4*>(chunk)[i] = src[i];
                        for (int i = tid; i < cc; i += nt) norms[i] = slice_norms[c0 + i];
                    }
                    __syncthreads();
                    if (active && step >= S && c0 == 0) {  // ICM: put the stage's codeword back
                        const float* old = words + idx[st * nt + tid] * gd;
#pragma unroll
                        for (int j = 0; j < gd; ++j) r[j] += old[j];
                    }
                    if constexpr (TENSOR) {  // cc == C; every lane of the warp calls
                        best = commvq_nearest_tensor(reg, active, chunk, norms, frag, bound, C,
                                                     rows_of_warp[tid / 32]);
                    } else if (active) {
                        commvq_scan<GD>(r, chunk, norms, c0, cc, gd, &m, &best);
                    }
                }
                if (!active) continue;
                best = best < 0 ? C - 1 : best;
                idx[st * nt + tid] = static_cast<uint8_t>(best);
                const float* w = words + best * gd;
#pragma unroll
                for (int j = 0; j < gd; ++j) r[j] -= w[j];
            }
            if (active)
                for (int st = 0; st < S; ++st)
                    dev::or_bits(code, st * G + g, p.index_bits,
                                 static_cast<uint32_t>(idx[st * nt + tid]));
        }
    }
    if (!staged_codes) return;
    __syncthreads();
    for (int i = tid; i < tokens * bytes; i += nt) {  // a token's bytes on consecutive threads
        const int token = i / bytes, b = i % bytes;
        const int pos = a.pos(u, first + token);
        a.page(u, pos)[R.key_codes + (pos % kPage) * R.key_code_bytes + b] =
            codes[token * stride + b];
    }
}

/// Grid (token tiles of blockDim.x <= kCvqTokens, units). At most 64 registers (8 CTAs, 32 warps
/// an SM): the spills this costs are outside the scans, once per group.
__global__ void __launch_bounds__(kCvqTokens, 8)
    commvq_encode_keys_kernel(const EncodeParams<dev::CommVQDevice> a) {
    __shared__ __align__(16) uint8_t pool[kCvqPoolBytes];
    const int u = static_cast<int>(blockIdx.y);
    const int first = static_cast<int>(blockIdx.x * blockDim.x);
    const int tokens = min(static_cast<int>(blockDim.x), a.n - first);
    const dev::CommVQDevice::Params& p = a.key_params(u);
    if (p.group_dim == kCvqRegisterGroupDim)
        commvq_encode_tile<kCvqRegisterGroupDim, false>(a, p, u, first, tokens, pool);
    else
        commvq_encode_tile<0, false>(a, p, u, first, tokens, pool);
}

/// As commvq_encode_keys_kernel, the warps searching on tensor cores (cvq_tensor_search_fits, a
/// GPU of sm_80 or later: BulkKeyEncoder checks both).
__global__ void __launch_bounds__(kCvqTokens, 8)
    commvq_encode_keys_tensor_kernel(const EncodeParams<dev::CommVQDevice> a) {
#if __CUDA_ARCH__ >= 800
    __shared__ __align__(16) uint8_t pool[kCvqTensorPoolBytes];
    const int u = static_cast<int>(blockIdx.y);
    const int first = static_cast<int>(blockIdx.x * blockDim.x);
    const int tokens = min(static_cast<int>(blockDim.x), a.n - first);
    commvq_encode_tile<kCvqTensorDim, true>(a, a.key_params(u), u, first, tokens, pool);
#else
    __trap();
#endif
}

/// The keys (codes) of every (unit, token) item of `a`.
template <>
struct BulkKeyEncoder<dev::CommVQDevice> {
    static constexpr bool kAvailable = true;
    static bool usable(const dev::CommVQDevice::Params&, size_t) { return true; }
    /// Whether the current GPU (sm_80 or later) searches p's slices on tensor cores, in CTAs of
    /// up to kCvqTokens tokens.
    static bool tensor_search(const dev::CommVQDevice::Params& p) {
        int device = 0, major = 0;
        check_cuda(cudaGetDevice(&device), "cudaGetDevice");
        check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
                   "compute capability");
        return major >= 8 && cvq_tensor_search_fits(p, kCvqTokens);
    }
    static const void* kernel(const dev::CommVQDevice::Params& p) {
        return tensor_search(p) ? reinterpret_cast<const void*>(&commvq_encode_keys_tensor_kernel)
                                : reinterpret_cast<const void*>(&commvq_encode_keys_kernel);
    }
    /// kCvqTokens tokens per CTA, fewer where that leaves under 4 CTAs per SM.
    static void launch(const EncodeParams<dev::CommVQDevice>& a, const dev::CommVQDevice::Params& p,
                       int sms, cudaStream_t stream) {
        if (a.n == 0 || a.units == 0) return;
        int nt = kCvqTokens;
        while (nt > 32 && static_cast<long long>(a.units) * ((a.n + nt - 1) / nt) < 4LL * sms)
            nt /= 2;
        const dim3 grid(static_cast<unsigned>((a.n + nt - 1) / nt), static_cast<unsigned>(a.units));
        if (tensor_search(p))
            commvq_encode_keys_tensor_kernel<<<grid, nt, 0, stream>>>(a);
        else
            commvq_encode_keys_kernel<<<grid, nt, 0, stream>>>(a);
        check_cuda(cudaGetLastError(), "commvq key encode kernel");
    }
};

}  // namespace veloxquant::cuda::codec
