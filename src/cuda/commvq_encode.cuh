// commvq's keys of a long append: a CTA holds up to kCvqTokens tokens of one unit, one thread per
// token, and walks the groups. For each (group, stage) step of the search it stages that stage's
// codebook slice (C codewords of group_dim floats, and their squared norms) in shared memory once
// for all its tokens, and every lane scans the same codeword at the same time (a broadcast read)
// against its own residual, held in registers at group_dim 8 (calibration's 4 pairs) and in a
// shared-memory row per token otherwise. CommVQDevice::encode (one thread per token) reads the
// codebooks (256 KB per head at 2 bits, d = 128) from global memory for every token.
// At group_dim 8 on sm_80 and later a kernel of its own searches on tensor cores instead
// (commvq_nearest_tensor, commvq_search.cuh: the same indices), in CTAs of up to
// kCvqTensorTokens tokens that stage a group's S slices, with their mma fragments, once for all
// its steps (one a step where S slices do not fit), the ICM sweep's searches bounded by the
// stage's current codeword. One append of 32K tokens x 8 heads (2 bits, d = 128; keys and
// values) on the H200: lane scans 4.82-4.86 ms, tensor search 3.34-3.36, with cheaper marks and
// the sweep's bound 2.96-3.00, with a group's slices staged once 2.43-2.47
// (bench/results/cuda_h200_20261203za_commvq_group_slices.txt).
// Shared memory of the lane scans: one pool carved per unit's parameters into the tokens' stage
// indices [stages][tokens], the tokens' codes [tokens][stage_stride(code bytes)] where they fit
// (else each thread builds its code in its page), the residual rows (other group_dims; the
// tokens then go in passes of as many as fit) and the codebook chunk: the largest power-of-two
// number of codewords that fits, the whole slice at group_dim 8 (a larger slice takes several
// chunks). The tensor search's: cvq_tensor_layout.
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

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/bulk_key_encode.h"
#include "cuda/codec_kernels.cuh"
#include "cuda/commvq_search.cuh"
#include "cuda/cuda_cache.h"
#include "device_codecs/commvq_device.h"

namespace veloxquant::cuda::codec {

constexpr int kCvqTokens = 128;  // most tokens (threads) per CTA of the lane scans
// The lane scans' shared-memory pool (ten CTAs an SM).
constexpr int kCvqPoolBytes = 20480;
constexpr int kCvqRegisterGroupDim = kCvqTensorDim;  // group_dim whose residual is in registers
__host__ __device__ constexpr int cvq_align16(int bytes) {
    return (bytes + 15) / 16 * 16;
}

// The tensor search's CTAs: 256 tokens (8 warps) sharing a group's staged slices, in at most
// kCvqTensorSmemBytes of dynamic shared memory (four CTAs fill an H100/H200 SM's 228 KB, 1 KB
// each reserved: 32 warps, as eight lane-scan CTAs of 128 tokens).
constexpr int kCvqTensorTokens = 256;
constexpr int kCvqTensorSmemBytes = 56320;

/// The tensor search's shared memory for stages x codewords slices, codes of code_bytes and nt
/// tokens: the stage indices [stages][nt], the warps' rows, the codes [nt][code_stride], then
/// `buffers` slices of slice_bytes (bounds, B fragments and norms as accumulators
/// (cvq_stage_tensor_slice), words, norms2). buffers = stages where that fits in `budget` bytes
/// (a group's slices staged once for all its steps), else 1 (one a step). A kernel given
/// layout(budget).bytes computes the same layout from that.
struct CvqTensorLayout {
    int rows = 0, codes = 0, code_stride = 0, slices = 0, slice_bytes = 0, buffers = 0, bytes = 0;
};
__host__ __device__ constexpr int cvq_tensor_bound_bytes() {
    return cvq_align16(4 * (1 + kCvqTensorDim));
}
__host__ __device__ constexpr CvqTensorLayout cvq_tensor_layout(int stages, int codewords,
                                                                int code_bytes, int nt,
                                                                int budget) {
    CvqTensorLayout l;
    l.rows = cvq_align16(stages * nt);
    l.codes = l.rows + nt / 32 * static_cast<int>(sizeof(CvqWarpRows));
    l.code_stride = (code_bytes + 3) / 4 * 4;
    l.slices = cvq_align16(l.codes + l.code_stride * nt);
    l.slice_bytes = cvq_tensor_bound_bytes() + cvq_fragment_bytes(codewords) +
                    4 * codewords * kCvqTensorDim + cvq_align16(4 * codewords);
    l.buffers = l.slices + stages * l.slice_bytes <= budget ? stages : 1;
    l.bytes = l.slices + l.buffers * l.slice_bytes;
    return l;
}

// Calibration's default (2 stages of 256 codewords, group_dim 8) at d = 128 and 2 bits: a
// group's two slices stay staged beside a full CTA's codes.
static_assert(cvq_tensor_layout(2, 256, 32, kCvqTensorTokens, kCvqTensorSmemBytes).buffers == 2,
              "the tensor search keeps 2-bit d = 128 slices staged for a group");

/// p's layout for CTAs of nt tokens in `budget` bytes.
__host__ __device__ inline CvqTensorLayout cvq_tensor_layout(const dev::CommVQDevice::Params& p,
                                                             int nt, int budget) {
    return cvq_tensor_layout(p.stages, p.codewords, dev::CommVQDevice::code_bytes(p), nt, budget);
}

/// Whether CTAs of nt tokens can search p's slices on tensor cores in `budget` bytes (group_dim
/// 8, whole slices of a multiple of 8 codewords, one staged beside the scratch).
inline bool cvq_tensor_search_fits(const dev::CommVQDevice::Params& p, int nt, int budget) {
    return p.group_dim == kCvqTensorDim && p.codewords % 8 == 0 &&
           cvq_tensor_layout(p, nt, budget).bytes <= budget;
}

/// The CTA's tokens first .. first + tokens - 1 of unit u (GD as commvq_scan; TENSOR: GD = 8,
/// cvq_tensor_search_fits, pool: cvq_tensor_layout's bytes of dynamic shared memory).
template <int GD, bool TENSOR>
__device__ __forceinline__ void commvq_encode_tile(const EncodeParams<dev::CommVQDevice>& a,
                                                   const dev::CommVQDevice::Params& p, int u,
                                                   int first, int tokens, uint8_t* pool) {
    static_assert(!TENSOR || GD == kCvqTensorDim, "the tensor search takes group_dim 8");
    const int nt = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
    const int S = p.stages, G = p.groups, C = p.codewords, gd = GD > 0 ? GD : p.group_dim;
    const int bytes = dev::CommVQDevice::code_bytes(p);
    const int steps = S + (S > 1 ? dev::CommVQDevice::kEncodeSweeps * S : 0);
    uint8_t* idx = pool;  // idx[st * nt + thread]
    uint32_t budget = 0;  // TENSOR: the launch's bytes (cvq_tensor_layout)
    if constexpr (TENSOR) asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(budget));
    const CvqTensorLayout L =
        TENSOR ? cvq_tensor_layout(p, nt, static_cast<int>(budget)) : CvqTensorLayout{};
    auto* rows_of_warp = reinterpret_cast<CvqWarpRows*>(pool + L.rows);  // TENSOR
    // Staged codes: an odd number of words a token for the lane scans (lanes or_bits into 32
    // banks), whole words under the tensor search.
    const int stride = TENSOR ? L.code_stride : stage_stride(bytes);
    int used = TENSOR ? L.codes : cvq_align16(S * nt);
    const bool staged_codes = TENSOR || used + stride * nt <= kCvqPoolBytes / 2;
    uint8_t* codes = pool + used;  // [tokens][stride], where staged
    if (staged_codes) used += stride * nt;
    // The lane scans: residual rows (GD = 0), then the codebook chunk.
    float* rows = reinterpret_cast<float*>(pool + cvq_align16(used));  // [tokens][gd + 1]
    const int per_pass =
        GD > 0 ? nt : min(nt, (kCvqPoolBytes - cvq_align16(used)) / 2 / (4 * (gd + 1)));
    if (GD == 0) used = cvq_align16(used) + per_pass * (gd + 1) * 4;
    used = cvq_align16(used);
    int cc = C;  // codewords per chunk: a power of two >= 2 (C is one), so chunks are full
    while (!TENSOR && cc > 2 && 4 * ((cc + 3) / 4 * 4 + cc * gd) > kCvqPoolBytes - used) cc /= 2;
    float* norms = reinterpret_cast<float*>(pool + used);
    float* chunk = norms + (cc + 3) / 4 * 4;
    // TENSOR: slice buffer b's bounds, fragments, words and norms2.
    const auto buffer = [&](int b) { return pool + L.slices + b * L.slice_bytes; };
    const auto buffer_words = [&](int b) {
        return reinterpret_cast<float*>(buffer(b) + cvq_tensor_bound_bytes() +
                                        cvq_fragment_bytes(C));
    };
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
            // ICM: the stage's current codeword back into the residual.
            const auto put_back = [&](const float* words, int st) {
                const float* old = words + idx[st * nt + tid] * gd;
#pragma unroll
                for (int j = 0; j < gd; ++j) r[j] += old[j];
            };
            // Greedy stages, then the ICM sweep; st = step % S.
            for (int step = 0, st = 0; step < steps; ++step, st = st + 1 < S ? st + 1 : 0) {
                const float* words;  // the slice's codeword i at words + i * gd
                int best = -1;
                if constexpr (TENSOR) {
                    // A group's slices staged once for its steps where they fit, else each step's.
                    const bool resident = L.buffers == S;
                    if (step == 0 || !resident) {
                        __syncthreads();  // the previous slices' reads are done
                        for (int b = 0; b < L.buffers; ++b) {
                            const int slice = (resident ? b : st) * G + g;
                            auto* base = buffer(b);
                            cvq_stage_tensor_slice(
                                p.words + slice * C * gd, p.norms2 + slice * C,
                                p.bounds + slice * (1 + gd), C, buffer_words(b),
                                buffer_words(b) + C * gd,
                                reinterpret_cast<uint2*>(base + cvq_tensor_bound_bytes()),
                                reinterpret_cast<float*>(base), tid, nt);
                        }
                        __syncthreads();
                    }
                    const int b = resident ? st : 0;
                    words = buffer_words(b);
                    if (active && step >= S) put_back(words, st);
                    // In the sweep the stage's current codeword bounds the search.
                    const int known = step >= S && active ? idx[st * nt + tid] : -1;
                    best = commvq_nearest_tensor(
                        reg, active, known, words, words + C * gd,
                        reinterpret_cast<const uint2*>(buffer(b) + cvq_tensor_bound_bytes()),
                        reinterpret_cast<const float*>(buffer(b)), C, rows_of_warp[tid / 32]);
                } else {
                    const float* slice = p.words + (st * G + g) * C * gd;
                    const float* slice_norms = p.norms2 + (st * G + g) * C;
                    words = cc == C ? chunk : slice;
                    float m = INFINITY;
                    for (int c0 = 0; c0 < C; c0 += cc) {
                        __syncthreads();  // the previous chunk's reads are done
                        const auto* src = reinterpret_cast<const float4*>(slice + c0 * gd);
                        for (int i = tid; i < cc * gd / 4; i += nt)
                            reinterpret_cast<float4*>(chunk)[i] = src[i];
                        for (int i = tid; i < cc; i += nt) norms[i] = slice_norms[c0 + i];
                        __syncthreads();
                        if (active && step >= S && c0 == 0) put_back(words, st);
                        if (active) commvq_scan<GD>(r, chunk, norms, c0, cc, gd, &m, &best);
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
/// GPU of sm_80 or later: BulkKeyEncoder checks both), CTAs of up to kCvqTensorTokens tokens in
/// cvq_tensor_layout's bytes of dynamic shared memory.
__global__ void __launch_bounds__(kCvqTensorTokens, 4)
    commvq_encode_keys_tensor_kernel(const EncodeParams<dev::CommVQDevice> a) {
#if __CUDA_ARCH__ >= 800
    extern __shared__ __align__(16) uint8_t pool[];
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
    /// The tensor search's shared memory a CTA on the current GPU: kCvqTensorSmemBytes where an
    /// SM holds four such CTAs, else half an SM's; 0 before sm_80 (no tf32 mma).
    static int tensor_budget() {
        int device = 0, major = 0, per_sm = 0, optin = 0;
        check_cuda(cudaGetDevice(&device), "cudaGetDevice");
        check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
                   "compute capability");
        check_cuda(
            cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device),
            "shared memory per SM");
        check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                   "shared memory per block");
        if (major < 8) return 0;
        const int four = per_sm / 4 - 1024;  // 1 KB reserved a CTA
        return std::min(optin,
                        four >= kCvqTensorSmemBytes ? kCvqTensorSmemBytes : per_sm / 2 - 1024);
    }
    /// Whether the current GPU (its tensor_budget) searches p's slices on tensor cores
    /// (kCvqTensorTokens a CTA fit).
    static bool tensor_search(const dev::CommVQDevice::Params& p, int budget) {
        return budget > 0 && cvq_tensor_search_fits(p, kCvqTensorTokens, budget);
    }
    static const void* kernel(const dev::CommVQDevice::Params& p) {
        return tensor_search(p, tensor_budget())
                   ? reinterpret_cast<const void*>(&commvq_encode_keys_tensor_kernel)
                   : reinterpret_cast<const void*>(&commvq_encode_keys_kernel);
    }
    /// kCvqTokens (tensor search: kCvqTensorTokens) tokens per CTA, fewer where that leaves
    /// under 4 CTAs per SM.
    static void launch(const EncodeParams<dev::CommVQDevice>& a, const dev::CommVQDevice::Params& p,
                       int sms, cudaStream_t stream) {
        if (a.n == 0 || a.units == 0) return;
        const int budget = tensor_budget();
        const bool tensor = tensor_search(p, budget);
        int nt = tensor ? kCvqTensorTokens : kCvqTokens;
        while (nt > 32 && static_cast<long long>(a.units) * ((a.n + nt - 1) / nt) < 4LL * sms)
            nt /= 2;
        const dim3 grid(static_cast<unsigned>((a.n + nt - 1) / nt), static_cast<unsigned>(a.units));
        if (tensor) {
            const int smem = cvq_tensor_layout(p, nt, budget).bytes;
            check_cuda(cudaFuncSetAttribute(commvq_encode_keys_tensor_kernel,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
                       "commvq key encode shared memory");
            commvq_encode_keys_tensor_kernel<<<grid, nt, smem, stream>>>(a);
        } else {
            commvq_encode_keys_kernel<<<grid, nt, 0, stream>>>(a);
        }
        check_cuda(cudaGetLastError(), "commvq key encode kernel");
    }
};

}  // namespace veloxquant::cuda::codec
