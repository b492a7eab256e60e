// qjl's keys of a long append as a tiled product: sign(S k) for a CTA's 64 tokens against
// 128 sketch rows at a time, each thread holding 8 tokens x 4 rows of sums in registers, the
// tokens and rows staged in shared memory as doubles 16 coordinates at a time. QjlDevice::encode
// (one thread per token) reads its key and a sketch row for every multiply-add; here each staged
// value serves 4 or 8 of them, and the double pipe rather than the loads sets the pace. On the
// H200, 32K tokens x 8 heads at d = 128, m = 256 with 4-bit values: 11.75 -> 1.96 ms the append
// (cuda_h200_20261202v_encode_ab.txt; 2 x 8.6 G double flops need 0.5 ms at the FP64 peak).
//
// Bit for bit the CPU's codes (QJLCodec::encode): every sum still runs over j = 0 .. d-1 in order
// in one thread, starting from +0.0. Each term is a product of two floats, exact in double
// (48 significant bits), so fma(s, k, acc) rounds once where the CPU's acc + s * k does, to the
// same value. Padding coordinates (j >= d) add +0.0, which changes no sum (a sum from +0.0 in
// round-to-nearest is never -0.0).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bulk_key_encode.h"
#include "cuda/codec_kernels.cuh"
#include "cuda/cuda_cache.h"
#include "device_codecs/qjl_device.h"

namespace veloxquant::cuda::codec {

constexpr int kQjlTokens = 64;  // tokens per CTA
constexpr int kQjlRows = 128;   // sketch rows per pass
constexpr int kQjlChunk = 16;   // coordinates staged at a time
constexpr int kQjlThreads = 256;
constexpr int kQjlTokensPerThread = 8, kQjlRowsPerThread = 4;
// Staged rows padded by two doubles: the staging's stores (16 coordinates each of two tokens or
// rows per warp) spread over the banks instead of piling on two, and the compute's 16-byte loads
// stay aligned.
constexpr int kQjlPad = 2;
static_assert(kQjlThreads / 32 * kQjlTokensPerThread == kQjlTokens, "a warp per 8 tokens");
static_assert(32 * kQjlRowsPerThread == kQjlRows, "a lane per 4 rows");

/// Grid (token tiles of kQjlTokens, units). Writes each token's sign bits and ||k||.
__global__ void __launch_bounds__(kQjlThreads)
    qjl_encode_keys_kernel(const EncodeParams<dev::QjlDevice> a) {
    __shared__ __align__(16) double keys[kQjlChunk][kQjlTokens + kQjlPad];
    __shared__ __align__(16) double rows[kQjlChunk][kQjlRows + kQjlPad];
    const int u = static_cast<int>(blockIdx.y), first = static_cast<int>(blockIdx.x) * kQjlTokens;
    const int tokens = min(kQjlTokens, a.n - first);
    const dev::QjlDevice::Params& p = a.key_params(u);
    const int d = p.d, m = p.m, tid = static_cast<int>(threadIdx.x);
    const int lane = tid & 31, warp = tid >> 5;
    const float* src = a.keys + (static_cast<size_t>(u) * a.n + first) * d;
    const HeadRegions R = a.store.regions[a.head(u)];
    if (tid < tokens) {  // ||k|| in j order, as the CPU
        const float* k = src + static_cast<size_t>(tid) * d;
        double norm2 = 0.0;
        for (int j = 0; j < d; ++j) norm2 = __fma_rn(static_cast<double>(k[j]), k[j], norm2);
        const int pos = a.pos(u, first + tid);
        reinterpret_cast<float*>(a.page(u, pos) + R.key_scalars)[pos % kPage] =
            static_cast<float>(sqrt(norm2));
    }
    for (int row0 = 0; row0 < m; row0 += kQjlRows) {
        double acc[kQjlTokensPerThread][kQjlRowsPerThread] = {};
        for (int j0 = 0; j0 < d; j0 += kQjlChunk) {
            __syncthreads();  // the previous chunk's reads are done
            for (int i = tid; i < kQjlChunk * kQjlTokens; i += kQjlThreads) {
                const int t = i / kQjlChunk, j = j0 + i % kQjlChunk;  // coalesced along j
                keys[i % kQjlChunk][t] =
                    t < tokens && j < d ? static_cast<double>(src[static_cast<size_t>(t) * d + j])
                                        : 0.0;
            }
            for (int i = tid; i < kQjlChunk * kQjlRows; i += kQjlThreads) {
                const int r = row0 + i / kQjlChunk, j = j0 + i % kQjlChunk;
                rows[i % kQjlChunk][i / kQjlChunk] =
                    r < m && j < d ? static_cast<double>(p.sketch[static_cast<size_t>(r) * d + j])
                                   : 0.0;
            }
            __syncthreads();
#pragma unroll 4
            for (int j = 0; j < kQjlChunk; ++j) {
                double k[kQjlTokensPerThread], s[kQjlRowsPerThread];
#pragma unroll
                for (int t = 0; t < kQjlTokensPerThread; t += 2) {  // a warp's 8 tokens: broadcast
                    const double2 v =
                        *reinterpret_cast<const double2*>(&keys[j][warp * kQjlTokensPerThread + t]);
                    k[t] = v.x;
                    k[t + 1] = v.y;
                }
#pragma unroll
                for (int r = 0; r < kQjlRowsPerThread; r += 2) {
                    const double2 v =
                        *reinterpret_cast<const double2*>(&rows[j][lane * kQjlRowsPerThread + r]);
                    s[r] = v.x;
                    s[r + 1] = v.y;
                }
#pragma unroll
                for (int t = 0; t < kQjlTokensPerThread; ++t)
#pragma unroll
                    for (int r = 0; r < kQjlRowsPerThread; ++r)
                        acc[t][r] = __fma_rn(s[r], k[t], acc[t][r]);
            }
        }
        // Lane l holds rows row0 + 4l .. 4l + 3 of the warp's tokens: 8 lanes make a 32-bit word.
#pragma unroll
        for (int t = 0; t < kQjlTokensPerThread; ++t) {
            uint32_t nibble = 0;
#pragma unroll
            for (int r = 0; r < kQjlRowsPerThread; ++r)
                if (acc[t][r] >= 0.0 && row0 + lane * kQjlRowsPerThread + r < m) nibble |= 1u << r;
            uint32_t word = nibble << (kQjlRowsPerThread * (lane & 7));
            for (int offset = 1; offset < 8; offset <<= 1)
                word |= __shfl_xor_sync(kFull, word, offset);
            const int token = warp * kQjlTokensPerThread + t;
            if ((lane & 7) != 0 || token >= tokens) continue;
            const int pos = a.pos(u, first + token);
            uint8_t* code = a.page(u, pos) + R.key_codes + (pos % kPage) * R.key_code_bytes;
            const int byte0 = (row0 + lane * kQjlRowsPerThread) / 8;  // 4 bytes of rows
#pragma unroll
            for (int b = 0; b < 4; ++b)
                if (byte0 + b < static_cast<int>(R.key_code_bytes))
                    code[byte0 + b] = static_cast<uint8_t>(word >> (8 * b));
        }
    }
}

template <>
struct BulkKeyEncoder<dev::QjlDevice> {
    static constexpr bool kAvailable = true;
    static bool usable(const dev::QjlDevice::Params&, size_t) { return true; }
    static const void* kernel(const dev::QjlDevice::Params&) {
        return reinterpret_cast<const void*>(&qjl_encode_keys_kernel);
    }
    static void launch(const EncodeParams<dev::QjlDevice>& a, const dev::QjlDevice::Params&, int,
                       cudaStream_t stream) {
        const dim3 grid(static_cast<unsigned>((a.n + kQjlTokens - 1) / kQjlTokens),
                        static_cast<unsigned>(a.units));
        qjl_encode_keys_kernel<<<grid, kQjlThreads, 0, stream>>>(a);
        check_cuda(cudaGetLastError(), "qjl key encode kernel");
    }
};

}  // namespace veloxquant::cuda::codec
