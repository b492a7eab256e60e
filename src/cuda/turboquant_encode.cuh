// The turboquant_rvq encoder of keys and values on the CPU's packed page layout (cuda_cache.h,
// TqPageLayout): norm, randomized Hadamard rotation, codebook search, LSB-first packing.
//
// G lanes per (head, token). Lane g of a token holds E = D / G coordinates as chunks of 8
// consecutive ones: its chunk k (k < E / 8) is chunk c = G k + g of the vector, coordinates
// 8c .. 8c + 7. The rotation then runs the CPU's butterflies in the CPU's order:
//   len 1, 2, 4       inside a chunk (registers),
//   len 8 .. 4G       between the token's lanes (shuffles),
//   len 8G .. D / 2   between a lane's chunks (registers),
// so the rotated coordinates are the CPU's bit for bit. A warp-wide load of chunk halves reads
// 16 contiguous bytes per lane, the token's row in order. The norms and the value scale's sums
// are each lane's sequential double sums added by a butterfly over the G lanes, not the CPU's one
// sequential sum, so codes are the CPU's up to exact ties of the norm (the parity test allows
// 0.1% of indices). The quotient u = y / ||k|| is the CPU's correctly rounded division, from one
// reciprocal per token (divide_by_reciprocal). A chunk's 8 indices are B whole bytes of the
// packed stream, so each lane stores its own.
//
// The bulk encoder takes G = D / 32 (32 coordinates per lane, 8 or 16 tokens per warp, 96
// registers, no shared staging), one kernel per (key bits, value bits); the short appends of
// decode steps G = D / 8 (8 coordinates per lane: a few microseconds for one token of 8 heads),
// one kernel for every width.
#pragma once

#include <cuda_fp16.h>

#include <cfloat>

#include "core/host_device.h"
#include "cuda/turboquant_kernels.cuh"

namespace veloxquant::cuda::kernels {

constexpr int kEncodeThreads = 128;  // threads per encode block
// Five blocks per SM: 96 registers at G = D / 32 and 20 warps per SM; 128 registers and 16
// warps were 5% slower at d = 128 with 1-bit keys and 2-bit values on the H200, the same at
// 4-bit.
constexpr int kEncodeMinBlocks = 5;

template <int D, int G>
struct EncodeShape {
    static_assert(G >= 2 && G <= 32 && (G & (G - 1)) == 0, "lanes per token: a power of two");
    static_assert(D % (8 * G) == 0, "each lane holds whole chunks of 8 coordinates");
    static constexpr int kCoords = D / G;  // coordinates per lane
    static constexpr int kChunks = kCoords / 8;
    static constexpr int kTokens = kEncodeThreads / G;  // tokens per block and step
};

/// The codebooks of one encode, in shared memory.
struct EncodeShared {
    double value_centroids_wide[16];  // value_centroids as doubles, for the scale's sums
    float key_centroids[kMaxStages * 16];
    float key_boundaries[kMaxStages * 15];
    float value_centroids[16];
    float value_boundaries[15];
};

/// A B-bit codebook (2^B centroids, 2^B - 1 ascending boundaries) and its nearest-centroid
/// search: the number of boundaries below x, which both CPU binary searches return (ties go to
/// the lower cell). B <= 2 keeps the codebook in registers and selects; B >= 3 runs the key
/// codec's binary search, its first two levels on boundaries held in registers and the rest
/// on the shared copy.
template <int B>
struct EncodeCodebook {
    static constexpr int kHalf = 1 << (B - 1);
    const float* c;  // shared memory
    const float* b;
    float mid, low_quarter, high_quarter;  // b[kHalf - 1], b[kHalf / 2 - 1], b[3 kHalf / 2 - 1]
    __device__ __forceinline__ EncodeCodebook(const float* centroids, const float* boundaries)
        : c(centroids),
          b(boundaries),
          mid(boundaries[kHalf - 1]),
          low_quarter(boundaries[kHalf / 2 - 1]),
          high_quarter(boundaries[kHalf + kHalf / 2 - 1]) {}
    __device__ __forceinline__ int index(float x) const {
        int idx = mid < x ? kHalf : 0;
        if ((idx ? high_quarter : low_quarter) < x) idx += kHalf / 2;
#pragma unroll
        for (int step = kHalf / 4; step > 0; step >>= 1)
            if (b[idx + step - 1] < x) idx += step;
        return idx;
    }
    __device__ __forceinline__ float centroid(int idx) const {
        return c[idx];
    }
};

template <>
struct EncodeCodebook<1> {
    float c0, c1, b0;
    __device__ __forceinline__ EncodeCodebook(const float* centroids, const float* boundaries)
        : c0(centroids[0]), c1(centroids[1]), b0(boundaries[0]) {}
    __device__ __forceinline__ int index(float x) const { return b0 < x ? 1 : 0; }
    __device__ __forceinline__ float centroid(int idx) const { return idx ? c1 : c0; }
};

template <>
struct EncodeCodebook<2> {
    float c0, c1, c2, c3, b0, b1, b2;
    __device__ __forceinline__ EncodeCodebook(const float* centroids, const float* boundaries)
        : c0(centroids[0]),
          c1(centroids[1]),
          c2(centroids[2]),
          c3(centroids[3]),
          b0(boundaries[0]),
          b1(boundaries[1]),
          b2(boundaries[2]) {}
    __device__ __forceinline__ int index(float x) const {
        const int hi = b1 < x ? 2 : 0;
        return hi + ((hi ? b2 : b0) < x ? 1 : 0);
    }
    __device__ __forceinline__ float centroid(int idx) const {
        return idx & 2 ? (idx & 1 ? c3 : c2) : (idx & 1 ? c1 : c0);
    }
};

/// Stores W words at dst (4-byte aligned) with the widest accesses its alignment allows.
template <int W>
__device__ __forceinline__ void store_words(uint8_t* dst, const uint32_t (&w)[W]) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(dst);
    if constexpr (W % 4 == 0) {
        if (addr % 16 == 0) {
#pragma unroll
            for (int k = 0; k < W; k += 4)
                reinterpret_cast<uint4*>(dst)[k / 4] =
                    make_uint4(w[k], w[k + 1], w[k + 2], w[k + 3]);
            return;
        }
    }
    if constexpr (W % 2 == 0) {
        if (addr % 8 == 0) {
#pragma unroll
            for (int k = 0; k < W; k += 2)
                reinterpret_cast<uint2*>(dst)[k / 2] = make_uint2(w[k], w[k + 1]);
            return;
        }
    }
#pragma unroll
    for (int k = 0; k < W; ++k) reinterpret_cast<uint32_t*>(dst)[k] = w[k];
}

/// Loads the lane's chunks of row ([D] floats). `vec`: the row is 16-byte aligned.
template <int D, int G>
__device__ __forceinline__ void load_chunks(float (&x)[D / G], const float* row, int g, bool vec) {
#pragma unroll
    for (int k = 0; k < EncodeShape<D, G>::kChunks; ++k) {
        const float* src = row + 8 * (G * k + g);
        if (vec) {
            const float4 a = __ldg(reinterpret_cast<const float4*>(src));
            const float4 b = __ldg(reinterpret_cast<const float4*>(src) + 1);
            x[8 * k] = a.x, x[8 * k + 1] = a.y, x[8 * k + 2] = a.z, x[8 * k + 3] = a.w;
            x[8 * k + 4] = b.x, x[8 * k + 5] = b.y, x[8 * k + 6] = b.z, x[8 * k + 7] = b.w;
        } else {
#pragma unroll
            for (int r = 0; r < 8; ++r) x[8 * k + r] = __ldg(src + r);
        }
    }
}

/// Sum over the token's G lanes (consecutive lanes, so the butterfly stays inside the token).
template <int G, typename T>
__device__ __forceinline__ T group_sum(T v) {
#pragma unroll
    for (int m = 1; m < G; m <<= 1) v += __shfl_xor_sync(kFull, v, m);
    return v;
}

/// Each lane's sequential double sum of x_j^2 (products of floats are exact in double), added
/// over the token's lanes.
template <int D, int G>
__device__ __forceinline__ double group_norm2(const float (&x)[D / G]) {
    double sq = 0.0;
#pragma unroll
    for (int j = 0; j < D / G; ++j)
        sq = fma(static_cast<double>(x[j]), static_cast<double>(x[j]), sq);
    return group_sum<G>(sq);
}

/// y = H (s * x) / sqrt(D): the sign flip and the CPU's fwht_orthonormal (butterflies
/// len = 1, 2, 4, ..., a + b then a - b, then the scale), over the token's G lanes.
template <int D, int G>
__device__ __forceinline__ void group_rotate(float (&x)[D / G], const float* signs, int g,
                                             float inv_sqrt_d) {
    constexpr int E = D / G;
#pragma unroll
    for (int k = 0; k < E / 8; ++k) {
        const float4* s = reinterpret_cast<const float4*>(signs + 8 * (G * k + g));
        const float4 a = __ldg(s), b = __ldg(s + 1);
        const float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int r = 0; r < 8; ++r) x[8 * k + r] = __fmul_rn(x[8 * k + r], f[r]);
    }
#pragma unroll
    for (int len = 1; len < 8; len <<= 1) register_butterflies(x, len);  // inside a chunk
#pragma unroll
    for (int m = 1; m < G; m <<= 1) lane_butterflies(x, g, m);  // len = 8m: the token's lanes
#pragma unroll
    for (int step = 8; step < E; step <<= 1) register_butterflies(x, step);  // len = G * step
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = __fmul_rn(x[i], inv_sqrt_d);
}

/// Stores the lane's chunk indices (chunk[k]: the 8 indices of chunk c = G k + g, B bits each,
/// LSB-first) into the stage's LSB-first stream at dst: chunk c is bits 8Bc .. 8Bc + 8B - 1,
/// B whole bytes at byte Bc, so each lane writes its own bytes (dst is 4-byte aligned).
template <int B, int D, int G>
__device__ __forceinline__ void store_chunks(const uint32_t (&chunk)[D / G / 8], int g, bool valid,
                                             uint8_t* dst) {
    if (!valid) return;
#pragma unroll
    for (int k = 0; k < D / G / 8; ++k) {
        uint8_t* p = dst + B * (G * k + g);
        if constexpr (B == 1) {
            *p = static_cast<uint8_t>(chunk[k]);
        } else if constexpr (B == 2) {
            *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(chunk[k]);
        } else if constexpr (B == 4) {
            *reinterpret_cast<uint32_t*>(p) = chunk[k];
        } else {  // 3 bytes at any offset
#pragma unroll
            for (int i = 0; i < 3; ++i) p[i] = static_cast<uint8_t>(chunk[k] >> (8 * i));
        }
    }
}

/// One key stage: quantizes u (to the residual u - C[idx], as the CPU, when another stage
/// follows) and stores the indices.
template <int B, int D, int G>
__device__ __forceinline__ void encode_key_stage(float (&u)[D / G], const float* centroids,
                                                 const float* boundaries, bool residual, int g,
                                                 bool valid, uint8_t* dst) {
    const EncodeCodebook<B> cb(centroids, boundaries);
    uint32_t chunk[D / G / 8];
#pragma unroll
    for (int k = 0; k < D / G / 8; ++k) {
        chunk[k] = 0;
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            const int idx = cb.index(u[8 * k + r]);
            if (residual) u[8 * k + r] = __fsub_rn(u[8 * k + r], cb.centroid(idx));
            chunk[k] += static_cast<uint32_t>(idx) << (r * B);  // disjoint bits: one IMAD
        }
    }
    store_chunks<B, D, G>(chunk, g, valid, dst);
}

/// Value codes of B bits: idx_j of u_j = y_j * inv (y = R v), or all zero when `zero` (as the
/// CPU); returns the least-squares scale ||v|| <u, c> / ||c||^2 (0 when `zero`).
template <int B, int D, int G>
__device__ __forceinline__ float encode_value_codes(const float (&y)[D / G], float inv,
                                                    double vnorm, bool zero, const EncodeShared& sh,
                                                    int g, bool valid, uint8_t* dst) {
    const EncodeCodebook<B> cb(sh.value_centroids, sh.value_boundaries);
    uint32_t chunk[D / G / 8];
    double uc = 0.0, cc = 0.0;
#pragma unroll
    for (int k = 0; k < D / G / 8; ++k) {
        chunk[k] = 0;
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            const float u = __fmul_rn(y[8 * k + r], inv);
            const int idx = cb.index(u);
            double c;  // 3- and 4-bit centroids from the shared doubles (no conversion)
            if constexpr (B >= 3)
                c = sh.value_centroids_wide[idx];
            else
                c = cb.centroid(idx);
            // Both products are of two floats, exact in double: the fused adds round as the
            // CPU's separate multiply and add.
            uc = fma(static_cast<double>(u), c, uc);
            cc = fma(c, c, cc);
            chunk[k] += static_cast<uint32_t>(idx) << (r * B);  // disjoint bits: one IMAD
        }
        if (zero) chunk[k] = 0;
    }
    store_chunks<B, D, G>(chunk, g, valid, dst);
    uc = group_sum<G>(uc);
    cc = group_sum<G>(cc);
    return !zero && cc > 0.0 ? static_cast<float>(vnorm * uc / cc) : 0.0f;
}

/// Keys: n = ||k|| (double, as the CPU), u = R k / n, then each stage quantizes the residual.
/// KB: the key bits, or 0 to read them from the layout.
template <int D, int G, int KB>
__device__ __forceinline__ void encode_group_keys(float (&x)[D / G], const EncodeArgs& a,
                                                  const EncodeShared& sh, uint8_t* block, int h,
                                                  int slot, int g, bool valid) {
    const TqPageLayout& L = a.layout;
    const float norm = static_cast<float>(sqrt(group_norm2<D, G>(x)));
    group_rotate<D, G>(x, a.tables.key_signs + h * D, g, a.tables.inv_sqrt_d);
    if (norm >= FLT_MIN) {  // 1 / norm is a normal float: one reciprocal for the D divisions
        const float inv = __frcp_rn(norm);
#pragma unroll
        for (int j = 0; j < D / G; ++j) x[j] = divide_by_reciprocal(x[j], norm, inv);
    } else {  // zero or subnormal norm (1 / norm overflows): the divisions themselves
#pragma unroll
        for (int j = 0; j < D / G; ++j) x[j] = norm > 0.0f ? __fdiv_rn(x[j], norm) : 0.0f;
    }
    uint8_t* code = block + slot * L.key_code_bytes;
    for (int s = 0; s < L.key_stages; ++s) {
        const float* c = sh.key_centroids + s * 16;
        const float* b = sh.key_boundaries + s * 15;
        const bool residual = s + 1 < L.key_stages;
        uint8_t* dst = code + s * L.key_stage_bytes;
        if constexpr (KB != 0) {
            encode_key_stage<KB, D, G>(x, c, b, residual, g, valid, dst);
        } else {
            switch (L.key_bits) {
                case 1:
                    encode_key_stage<1, D, G>(x, c, b, residual, g, valid, dst);
                    break;
                case 2:
                    encode_key_stage<2, D, G>(x, c, b, residual, g, valid, dst);
                    break;
                case 3:
                    encode_key_stage<3, D, G>(x, c, b, residual, g, valid, dst);
                    break;
                default:
                    encode_key_stage<4, D, G>(x, c, b, residual, g, valid, dst);
                    break;
            }
        }
    }
    if (valid && g == 0) reinterpret_cast<float*>(block + L.key_norms_offset)[slot] = norm;
}

/// Values: fp16, or R v / ||v|| quantized with one least-squares scale per token. VB: the value
/// bits, or 0 to read them from the layout.
template <int D, int G, int VB>
__device__ __forceinline__ void encode_group_values(float (&x)[D / G], const EncodeArgs& a,
                                                    const EncodeShared& sh, uint8_t* block, int h,
                                                    int slot, int g, bool valid) {
    const TqPageLayout& L = a.layout;
    uint8_t* vcode = block + L.value_codes_offset + slot * L.value_code_bytes;
    const int bits = VB != 0 ? VB : L.value_bits;
    if (bits == 16) {  // the lane's chunks, 8 halves each
#pragma unroll
        for (int k = 0; k < D / G / 8; ++k) {
            uint32_t w[4];
#pragma unroll
            for (int r = 0; r < 4; ++r)
                w[r] = pack_half2(__float2half_rn(x[8 * k + 2 * r]),
                                  __float2half_rn(x[8 * k + 2 * r + 1]));
            if (valid) store_words(vcode + 16 * (G * k + g), w);
        }
        return;
    }
    const double vnorm = sqrt(group_norm2<D, G>(x));
    group_rotate<D, G>(x, a.tables.value_signs + h * D, g, a.tables.inv_sqrt_d);
    // v = 0, or a norm under 1 / FLT_MAX, is stored as zero codes and scale (as the CPU).
    const float reciprocal = vnorm > 0.0 ? static_cast<float>(1.0 / vnorm) : 0.0f;
    const bool zero = !(vnorm > 0.0 && reciprocal <= FLT_MAX);
    const float inv = zero ? 0.0f : reciprocal;
    float scale;
    if constexpr (VB == 1 || VB == 2 || VB == 4) {
        scale = encode_value_codes<VB, D, G>(x, inv, vnorm, zero, sh, g, valid, vcode);
    } else {
        switch (bits) {
            case 1:
                scale = encode_value_codes<1, D, G>(x, inv, vnorm, zero, sh, g, valid, vcode);
                break;
            case 2:
                scale = encode_value_codes<2, D, G>(x, inv, vnorm, zero, sh, g, valid, vcode);
                break;
            default:
                scale = encode_value_codes<4, D, G>(x, inv, vnorm, zero, sh, g, valid, vcode);
                break;
        }
    }
    if (valid && g == 0) reinterpret_cast<float*>(block + L.value_scales_offset)[slot] = scale;
}

/// Blocks loop over steps of kTokens items (item = head * n_tokens + token, so a step reads
/// consecutive rows of the [heads][n][D] inputs). Lanes past the last item encode a copy of it
/// (every lane takes part in the shuffles) and store nothing. KB, VB: the key and value bits the
/// kernel is specialized to (the layout's), or 0 for a kernel that reads them from the layout:
/// the short appends' encoder, which alone takes a batch of sequences (EncodeArgs::pools; item =
/// (sequence * heads + head) * n_tokens + token).
template <int D, int G, int KB, int VB>
__global__ void __launch_bounds__(kEncodeThreads, kEncodeMinBlocks)
    encode_kernel(const EncodeArgs a) {
    using Shape = EncodeShape<D, G>;
    __shared__ EncodeShared sh;
    const TqPageLayout& L = a.layout;
    const TqDeviceTables& T = a.tables;
    const int levels = 1 << L.key_bits;
    for (int i = threadIdx.x; i < L.key_stages * 16; i += kEncodeThreads) {
        const int s = i / 16, k = i % 16;
        if (k < levels) sh.key_centroids[i] = T.key_centroids[s * levels + k];
        if (k < levels - 1) sh.key_boundaries[s * 15 + k] = T.key_boundaries[s * (levels - 1) + k];
    }
    if (L.value_bits != 16) {
        const int vlevels = 1 << L.value_bits, t = threadIdx.x;
        if (t < vlevels) {
            sh.value_centroids[t] = T.value_centroids[t];
            sh.value_centroids_wide[t] = T.value_centroids[t];
        }
        if (t < vlevels - 1) sh.value_boundaries[t] = T.value_boundaries[t];
    }
    __syncthreads();

    const int g = threadIdx.x % G;
    const long long items = static_cast<long long>(a.batch) * L.num_kv_heads * a.n_tokens;
    const bool vec =
        ((reinterpret_cast<uintptr_t>(a.keys) | reinterpret_cast<uintptr_t>(a.values)) & 15) == 0;
    for (long long first = static_cast<long long>(blockIdx.x) * Shape::kTokens; first < items;
         first += static_cast<long long>(gridDim.x) * Shape::kTokens) {
        const long long want = first + threadIdx.x / G;
        const bool valid = want < items;
        const long long item = valid ? want : items - 1;
        const int token = static_cast<int>(item % a.n_tokens);
        int h = static_cast<int>(item / a.n_tokens), pos = a.start + token;
        uint8_t* pool = a.pool;
        const int32_t* table = a.page_table;
        if constexpr (KB == 0) {
            if (a.pools != nullptr) {  // a short append's batch: h counts b * heads + head
                const int b = h / L.num_kv_heads;
                h -= b * L.num_kv_heads;
                pos = a.starts[b] + token;
                pool = a.pools[b];
                if (a.page_tables != nullptr) table = a.page_tables[b];
            }
        }
        uint8_t* block = head_block(pool, table, L, pos, h);
        const int slot = pos % kPage;
        float k[D / G], v[D / G];
        load_chunks<D, G>(k, a.keys + item * D, g, vec);
        load_chunks<D, G>(v, a.values + item * D, g, vec);
        encode_group_keys<D, G, KB>(k, a, sh, block, h, slot, g, valid);
        encode_group_values<D, G, VB>(v, a, sh, block, h, slot, g, valid);
    }
}

}  // namespace veloxquant::cuda::kernels
