// spectral's keys of a long append, a CTA per 32 tokens of one unit (lane l: token l):
//  1. y = U (k - mu) on the coded directions as a tiled product: each warp holds 32 slots of its
//     lane's token in registers (128 slots a pass), the tokens' k - mu and the slots' basis rows
//     staged in shared memory as doubles 8 coordinates at a time (the next 8 loaded meanwhile).
//     y_r (float) and ys_r = y_r / sigma_r (double) of every (slot, token) go to shared memory.
//  2. Warp 0 sums each token's mean square of ys, warp 1 its sum of w y^2 (the same at every
//     spread). 3. Warp w fits spreads w, w + 4, ...: the levels and fit_spread's other four sums
//     over the slots, for its 32 tokens at once; warp 0 keeps the first lowest error in spread
//     order. 4. The best spread's levels are ORed into shared code words and copied out.
// SpectralDevice::encode (one thread per token: 11.2 ms the append of 32K tokens x 8 heads on the
// H200) reads the basis for every multiply-add and divides y_r / sigma_r and 1 / (rms f) again
// for every level; here each staged value serves 32 multiply-adds, and each quotient all uses.
//
// Bit for bit SpectralDevice::encode (and so SpectralCodec::encode): every double operation has
// the same operands and rounding, and every sum runs in its order in one thread from +0.0:
//  - y_r: acc + u_j (k_j - mu_j) over j = 0 .. d-1, a multiply then an add (the term is not exact
//    in double: no FMA; codec_backend.cu, which includes this file, builds with --fmad=false, as
//    the device codec needs). Padding coordinates add 0 * 0 = +0.0, which changes no sum from +0.0.
//  - ys_r, w_r y_r^2 and 1 / (rms f) are computed once instead of at every use: the same
//    operation on the same values gives the same double.
//  - Only independent work moves: the spreads' fits run side by side (each its own sums), the
//    keep-first choice still walks them in spread order; a lane searches four slots' levels side
//    by side (quantize_sorted's probes, step by step), then adds them in slot order; code fields
//    are disjoint bits, ORed in any order into zeroed words whose little-endian bytes are the
//    LSB-first stream of or_field.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bulk_key_encode.h"
#include "cuda/codec_kernels.cuh"
#include "cuda/cuda_cache.h"
#include "device_codecs/device_common.h"
#include "device_codecs/spectral_device.h"

namespace veloxquant::cuda::codec {

constexpr int kSpectralTokens = 32;  // tokens per CTA, one per lane
constexpr int kSpectralWarps = 4;
constexpr int kSpectralThreads = 32 * kSpectralWarps;
constexpr int kSpectralSlots = 32;                              // per warp and pass
constexpr int kSpectralPass = kSpectralWarps * kSpectralSlots;  // slots per pass
constexpr int kSpectralChunk = 8;                               // coordinates staged at a time
constexpr int kSpectralKeyLoads = kSpectralChunk * kSpectralTokens / kSpectralThreads;
constexpr int kSpectralRowLoads = kSpectralChunk * kSpectralPass / kSpectralThreads;
constexpr int kSpectralRound = 16;  // spreads fitted per round (spectral has 10)
constexpr int kSpectralGroup = 4;   // slots whose levels a lane searches side by side
// Most code words of a token, at an odd stride (stage_stride): lanes OR into 32 banks.
constexpr int kSpectralWordStride =
    stage_stride(dev::kMaxDim * dev::SpectralDevice::kMaxBits / 8) / 4;

/// Shared memory of one phase at a time: the product's staging (rows padded by two doubles so
/// that a warp's staging stores spread over the banks and the 16-byte loads stay aligned), the
/// fits' results, the code words.
union SpectralScratch {
    struct {
        double keys[kSpectralChunk][kSpectralTokens + 2];  // k_j - mu_j
        double rows[kSpectralChunk][kSpectralPass + 2];
    } stage;
    struct {
        double err[kSpectralRound][kSpectralTokens], scale[kSpectralRound][kSpectralTokens];
    } fit;
    uint32_t words[kSpectralTokens * kSpectralWordStride];
};

/// Dynamic shared memory: ys then y, [slot][token], for num_slots <= d slots.
inline size_t spectral_encode_smem_bytes(int d) {
    return static_cast<size_t>(d) * kSpectralTokens * (sizeof(double) + sizeof(float));
}

/// Grid (token tiles of kSpectralTokens, units). Writes each token's code and scale.
__global__ void __launch_bounds__(kSpectralThreads)
    spectral_encode_keys_kernel(const EncodeParams<dev::SpectralDevice> a) {
    using Spectral = dev::SpectralDevice;
    constexpr int T = kSpectralTokens;
    extern __shared__ __align__(16) uint8_t spectral_smem[];
    __shared__ __align__(16) SpectralScratch scratch;
    // The slots' sigma and w and the centroids as doubles (exact), converted once.
    __shared__ double sigma[dev::kMaxDim], weight[dev::kMaxDim],
        centroids[Spectral::kCodebookFloats];
    __shared__ float boundaries[Spectral::kCodebookFloats - Spectral::kMaxBits];
    __shared__ int coord[dev::kMaxDim], field[dev::kMaxDim];  // basis row; bit offset << 4 | width
    __shared__ int run[Spectral::kMaxBits + 1];
    __shared__ double rms[T], wyy[T], inv_best[T];
    __shared__ int best_of[T];
    __shared__ uint8_t* code_of[T];
    const int u = static_cast<int>(blockIdx.y), first = static_cast<int>(blockIdx.x) * T;
    const int tokens = min(T, a.n - first);
    const Spectral::Params& p = a.key_params(u);
    const int d = p.d, n = p.num_slots, tid = static_cast<int>(threadIdx.x);
    const int lane = tid & 31, warp = tid >> 5;
    double* ys = reinterpret_cast<double*>(spectral_smem);
    float* y = reinterpret_cast<float*>(ys + n * T);
    for (int k = tid; k < n; k += kSpectralThreads) {
        sigma[k] = p.slot_sigma[k];
        weight[k] = p.slot_weight[k];
        coord[k] = p.slot_coord[k];
        int b = Spectral::kMaxBits, run_first = 0, bit = 0;  // slot k's run and its offset
        while (k >= run_first + p.slots_of_width[b]) {
            run_first += p.slots_of_width[b];
            bit += p.slots_of_width[b] * b;
            --b;
        }
        field[k] = (bit + (k - run_first) * b) << 4 | b;
    }
    for (int i = tid; i < Spectral::kCodebookFloats; i += kSpectralThreads) {
        centroids[i] = p.centroids[i];
        if (i < Spectral::kCodebookFloats - Spectral::kMaxBits) boundaries[i] = p.boundaries[i];
    }
    if (tid <= Spectral::kMaxBits) run[tid] = p.slots_of_width[tid];

    __syncthreads();
    const float* src = a.keys + (static_cast<size_t>(u) * a.n + first) * d;
    for (int row0 = 0; row0 < n; row0 += kSpectralPass) {
        // Element i = tid + l kSpectralThreads of a chunk: token (or row) i / 8, coordinate i % 8
        // (coalesced along j); zeros past the tokens, the slots and d.
        float key[kSpectralKeyLoads], mean[kSpectralKeyLoads], row[kSpectralRowLoads];
        auto fetch = [&](int j0) {
            const int j = j0 + tid % kSpectralChunk;
#pragma unroll
            for (int l = 0; l < kSpectralKeyLoads; ++l) {
                const int t = (tid + l * kSpectralThreads) / kSpectralChunk;
                const bool in = t < tokens && j < d;
                key[l] = in ? src[static_cast<size_t>(t) * d + j] : 0.0f;
                mean[l] = in ? p.mean[j] : 0.0f;
            }
#pragma unroll
            for (int l = 0; l < kSpectralRowLoads; ++l) {
                const int k = row0 + (tid + l * kSpectralThreads) / kSpectralChunk;
                row[l] = k < n && j < d ? p.basis[static_cast<size_t>(coord[k]) * d + j] : 0.0f;
            }
        };
        fetch(0);
        double acc[kSpectralSlots] = {};  // y of slots row0 + 32 warp + r, token lane
        for (int j0 = 0; j0 < d; j0 += kSpectralChunk) {
            __syncthreads();  // the previous chunk's reads are done
#pragma unroll
            for (int l = 0; l < kSpectralKeyLoads; ++l) {
                const int i = tid + l * kSpectralThreads;
                scratch.stage.keys[i % kSpectralChunk][i / kSpectralChunk] =
                    static_cast<double>(key[l]) - static_cast<double>(mean[l]);
            }
#pragma unroll
            for (int l = 0; l < kSpectralRowLoads; ++l) {
                const int i = tid + l * kSpectralThreads;
                scratch.stage.rows[i % kSpectralChunk][i / kSpectralChunk] = row[l];
            }
            __syncthreads();
            if (j0 + kSpectralChunk < d) fetch(j0 + kSpectralChunk);
            if (row0 + warp * kSpectralSlots >= n) continue;  // no slot of this warp's
#pragma unroll
            for (int j = 0; j < kSpectralChunk; ++j) {
                const double k = scratch.stage.keys[j][lane];
#pragma unroll
                for (int r = 0; r < kSpectralSlots; r += 2) {  // broadcast
                    const double2 s = *reinterpret_cast<const double2*>(
                        &scratch.stage.rows[j][warp * kSpectralSlots + r]);
                    acc[r] += s.x * k;
                    acc[r + 1] += s.y * k;
                }
            }
        }
#pragma unroll
        for (int r = 0; r < kSpectralSlots; ++r) {
            const int k = row0 + warp * kSpectralSlots + r;
            if (k >= n) break;
            const float yk = static_cast<float>(acc[r]);
            y[k * T + lane] = yk;
            ys[k * T + lane] = yk / sigma[k];
        }
    }
    __syncthreads();
    if (warp == 0) {  // rms = sqrt(mean of ys^2), in slot order
        double ms = 0.0;
        for (int k = 0; k < n; ++k) ms += ys[k * T + lane] * ys[k * T + lane];
        rms[lane] = sqrt(ms / static_cast<double>(n));
    } else if (warp == 1) {  // fit_spread's sum of w y^2, in slot order
        double s = 0.0;
        for (int k = 0; k < n; ++k) s += weight[k] * y[k * T + lane] * y[k * T + lane];
        wyy[lane] = s;
    }
    __syncthreads();

    // fit_spread for spread f0 + f of the lane's token; warp 0 keeps the best (the encoder looks
    // no further than spread 0 unless rms > 0).
    const double rms_t = rms[lane];
    double best_err = INFINITY, best_scale = 0.0;
    int best_f = -1;  // none: no error below infinity (NaN keys); levels then stay 0
    for (int f0 = 0; f0 < p.num_spreads; f0 += kSpectralRound) {
        const int nf = min(kSpectralRound, p.num_spreads - f0);
        for (int f = warp; f < nf; f += kSpectralWarps) {
            const double inv = rms_t > 0.0 ? 1.0 / (rms_t * p.spreads[f0 + f]) : 0.0;  // level's
            double yy0 = 0.0, y0y0 = 0.0, wyy0 = 0.0, wy0y0 = 0.0;
            for (int b = Spectral::kMaxBits, k0 = 0; b >= 1; k0 += run[b], --b) {
                const double* c = centroids + Spectral::centroid_offset(b);
                const float* cells = boundaries + Spectral::boundary_offset(b);
                const int end = k0 + run[b];
                for (int k = k0; k < end; k += kSpectralGroup) {
                    float z[kSpectralGroup];
                    int level[kSpectralGroup];
#pragma unroll
                    for (int g = 0; g < kSpectralGroup; ++g) {
                        z[g] =
                            k + g < end ? static_cast<float>(ys[(k + g) * T + lane] * inv) : 0.0f;
                        level[g] = 0;
                    }
                    // quantize_sorted's search: with 2^m - 1 cells left it probes the middle one,
                    // lo + 2^(m-1) - 1, and keeps 2^(m-1) - 1 on either side; so do these b steps.
                    for (int step = 1 << (b - 1); step > 0; step >>= 1)
#pragma unroll
                        for (int g = 0; g < kSpectralGroup; ++g)
                            if (cells[level[g] + step - 1] < z[g]) level[g] += step;
#pragma unroll
                    for (int g = 0; g < kSpectralGroup && k + g < end; ++g) {
                        const double y0 = sigma[k + g] * c[level[g]];
                        const double w = weight[k + g], yk = y[(k + g) * T + lane];
                        yy0 += yk * y0;
                        y0y0 += y0 * y0;
                        wyy0 += w * yk * y0;
                        wy0y0 += w * y0 * y0;
                    }
                }
            }
            const double sc = y0y0 > 0.0 ? yy0 / y0y0 : 0.0;
            scratch.fit.scale[f][lane] = sc;
            scratch.fit.err[f][lane] = wyy[lane] - 2.0 * sc * wyy0 + sc * sc * wy0y0;
        }
        __syncthreads();
        if (warp == 0)
            for (int f = 0; f < nf && (f0 + f == 0 || rms_t > 0.0); ++f)
                if (scratch.fit.err[f][lane] < best_err) {
                    best_err = scratch.fit.err[f][lane];
                    best_scale = scratch.fit.scale[f][lane];
                    best_f = f0 + f;
                }
        __syncthreads();  // the results are read before the next round (or the words) reuse them
    }

    if (warp == 0) {
        best_of[lane] = best_f;
        inv_best[lane] = best_f >= 0 && rms_t > 0.0 ? 1.0 / (rms_t * p.spreads[best_f]) : 0.0;
        if (lane < tokens) {
            const HeadRegions R = a.store.regions[a.head(u)];
            const int pos = a.pos(u, first + lane);
            uint8_t* page = a.page(u, pos);
            code_of[lane] = page + R.key_codes + (pos % kPage) * R.key_code_bytes;
            reinterpret_cast<float*>(page + R.key_scalars)[pos % kPage] =
                static_cast<float>(best_scale);
        }
    }
    const int stride = stage_stride(p.code_bytes) / 4;  // words per token
    for (int i = tid; i < T * stride; i += kSpectralThreads) scratch.words[i] = 0;
    __syncthreads();
    for (int i = tid; i < n * T; i += kSpectralThreads) {  // slot i / T, token lane
        if (best_of[lane] < 0) continue;
        const int b = field[i / T] & 15, bit = field[i / T] >> 4, shift = bit & 31;
        const float z = static_cast<float>(ys[i] * inv_best[lane]);
        const auto v = static_cast<uint32_t>(
            dev::quantize_sorted(boundaries + Spectral::boundary_offset(b), (1 << b) - 1, z));
        uint32_t* word = scratch.words + lane * stride + (bit >> 5);
        atomicOr(word, v << shift);
        if (shift + b > 32) atomicOr(word + 1, v >> (32 - shift));
    }
    __syncthreads();
    const auto* bytes = reinterpret_cast<const uint8_t*>(scratch.words);  // little-endian words
    for (int i = tid; i < tokens * p.code_bytes; i += kSpectralThreads) {
        const int t = i / p.code_bytes, byte = i % p.code_bytes;
        code_of[t][byte] = bytes[t * stride * 4 + byte];
    }
}

/// One CTA per tile of tokens, as qjl's. Dynamic shared memory 48 KB at d = 128 beside the static
/// 23 KB: three CTAs an SM on the H200 (as the registers allow), one at d = 256.
template <>
struct BulkKeyEncoder<dev::SpectralDevice> {
    static constexpr bool kAvailable = true;
    static bool usable(const dev::SpectralDevice::Params& p, size_t smem_optin) {
        cudaFuncAttributes attr{};
        check_cuda(cudaFuncGetAttributes(&attr, spectral_encode_keys_kernel),
                   "spectral key encode attributes");
        return attr.sharedSizeBytes + spectral_encode_smem_bytes(p.d) <= smem_optin;
    }
    static const void* kernel(const dev::SpectralDevice::Params&) {
        return reinterpret_cast<const void*>(&spectral_encode_keys_kernel);
    }
    static void launch(const EncodeParams<dev::SpectralDevice>& a,
                       const dev::SpectralDevice::Params&, int, cudaStream_t stream) {
        const auto smem = static_cast<int>(spectral_encode_smem_bytes(a.store.d));
        check_cuda(cudaFuncSetAttribute(spectral_encode_keys_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
                   "spectral key encode shared memory");
        const dim3 grid(static_cast<unsigned>((a.n + kSpectralTokens - 1) / kSpectralTokens),
                        static_cast<unsigned>(a.units));
        spectral_encode_keys_kernel<<<grid, kSpectralThreads, smem, stream>>>(a);
        check_cuda(cudaGetLastError(), "spectral key encode kernel");
    }
};

}  // namespace veloxquant::cuda::codec
