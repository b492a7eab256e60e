// Header-only CUDA kernels of the turboquant_rvq key codec and the value codec on the CPU's
// packed page layout (cuda_cache.h, TqPageLayout):
//   encode_kernel          one thread per (head, token): norm, randomized Hadamard rotation,
//                          codebook search, LSB-first bit packing; bit-identical to the CPU
//                          (same float operations in the same order, no contraction)
//   dequantize_kernel      one warp per (head, token), bit-identical to the CPU decode
//   merge_kernel           combines the decode's splits and applies the inverse value rotation
// The split-K decode attention kernel itself is in turboquant_decode.cuh.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cuda_cache.h"
#include "cuda/warp_reduce.cuh"

namespace veloxquant::cuda::kernels {

constexpr int kPage = 64;        // tokens per page
constexpr int kDecodeWarps = 4;  // warps per decode CTA; warp w takes pages w, w + 4, ...
constexpr int kMaxGroup = 8;     // query heads per KV head
constexpr int kMaxStages = 3;    // turboquant_rvq stages
constexpr int kEncodeWarps = 8;
constexpr unsigned kFull = 0xffffffffu;

/// Decode-kernel arguments the launcher derives from DecodeArgs (split plan, workspace).
struct DecodeKernelParams {
    DecodeArgs args;
    int pages_per_split = 0;
    int splits = 0;
    int ring = 0;                  // pages in flight per warp (cp.async ring depth), 1..4
    float* partial_o = nullptr;    // [batch][kv head][split][group][head_dim]
    float2* partial_ml = nullptr;  // [batch][kv head][split][group] (max, sum) in log2 units
};

// ---------------------------------------------------------------------------------------------
// PTX wrappers

__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();  // the decode kernel needs sm_80 or newer; the launcher refuses older devices
#endif
}

/// Integer mma m16n8k32: unsigned 8-bit A (row), signed 8-bit B (column), int32 accumulators.
__device__ __forceinline__ void mma_16832_u8s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#if __CUDA_ARCH__ >= 750
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s)
                 : "memory");
#else
    __trap();
#endif
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#else
    *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

/// Waits until at most `pending` (0..3) committed groups are still in flight.
__device__ __forceinline__ void cp_async_wait(int pending) {
#if __CUDA_ARCH__ >= 800
    switch (pending) {
        case 0:
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
            break;
        case 1:
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
            break;
        case 2:
            asm volatile("cp.async.wait_group 2;\n" ::: "memory");
            break;
        default:
            asm volatile("cp.async.wait_group 3;\n" ::: "memory");
            break;
    }
#endif
}

/// 2^x for x <= 0 (MUFU.EX2, flushing subnormal results to 0; -inf gives 0).
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ uint32_t pack_half2(__half lo, __half hi) {
    return static_cast<uint32_t>(__half_as_ushort(lo)) |
           (static_cast<uint32_t>(__half_as_ushort(hi)) << 16);
}

// ---------------------------------------------------------------------------------------------
// Warp helpers. A warp holds a d-vector as E = d / 32 consecutive coordinates per lane
// (coordinate j = lane * E + e).

/// Orthonormal Walsh-Hadamard transform with the CPU's butterfly order (len = 1, 2, 4, ...;
/// a + b then a - b) and final scale, so results are bit-identical to fwht_orthonormal.
template <int E>
__device__ __forceinline__ void warp_fwht(float (&x)[E], int lane, float inv_sqrt_d) {
#pragma unroll
    for (int len = 1; len < E; len <<= 1) {
#pragma unroll
        for (int e = 0; e < E; ++e) {
            if ((e & len) == 0) {
                const float a = x[e], b = x[e + len];
                x[e] = __fadd_rn(a, b);
                x[e + len] = __fsub_rn(a, b);
            }
        }
    }
#pragma unroll
    for (int lm = 1; lm < 32; lm <<= 1) {
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const float other = __shfl_xor_sync(kFull, x[e], lm);
            x[e] = (lane & lm) ? __fsub_rn(other, x[e]) : __fadd_rn(x[e], other);
        }
    }
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = __fmul_rn(x[e], inv_sqrt_d);
}

/// Index i of a packed LSB-first stream of `bits`-bit indices (the CPU's read_packed).
__device__ __forceinline__ int read_packed(const uint8_t* packed, int i, int bits) {
    const int bit = i * bits, byte = bit >> 3, shift = bit & 7;
    uint32_t word = packed[byte];
    if (shift + bits > 8) word |= static_cast<uint32_t>(packed[byte + 1]) << 8;
    return static_cast<int>((word >> shift) & ((1u << bits) - 1u));
}

__device__ __forceinline__ uint8_t* head_block(uint8_t* pool, const int32_t* page_table,
                                               const TqPageLayout& L, int pos, int head) {
    return pool + static_cast<size_t>(page_table[pos / kPage]) * L.page_bytes +
           static_cast<size_t>(head) * L.head_bytes;
}

// ---------------------------------------------------------------------------------------------
// Encode: one thread per (head, token). A warp takes tiles of 32 consecutive items (item =
// head * n_tokens + token, so a tile is 32 consecutive rows of the [heads][n][d] inputs, 16 KB
// contiguous at d = 128); lane i encodes row i alone, with the CPU's loops in the CPU's order:
// the norms are the CPU's sequential double sums (bit-identical, not just nearly), the
// rotation is the same butterflies, the least-squares scale the same double sums. Nothing
// crosses lanes, so there are no shuffles, no warp reductions and no shared packing scratch,
// and the per-token scalar work (sqrt, double divisions) is done once per token instead of in
// all 32 lanes. The rows reach the lanes through shared memory: each tile is copied coalesced
// with cp.async (keys and values in two buffers; the next tile's keys are in flight while this
// tile's values are encoded, and its values while its keys are), then each lane reads its row.

constexpr int kEncodeTile = 32;  // items per warp tile: one per lane

/// A tile's rows in shared memory. The row stride D + 4 keeps 16-byte rows aligned and makes
/// the lanes' 16-byte row reads conflict-free (each 8-lane phase hits 8 distinct 16-byte bank
/// groups, since (D + 4) / 4 is odd).
template <int D>
struct EncodeShared {
    float rows[2][kEncodeTile][D + 4];  // [keys, values][lane][coordinate]
    float key_centroids[kMaxStages * 16];
    float key_boundaries[kMaxStages * 15];
    float value_centroids[16];
    float value_boundaries[15];
};

/// Starts the copy of tile `tile`'s rows of src ([items][D]) into rows; lanes take 16-byte
/// chunks in order, so each warp-wide step reads 512 contiguous bytes. Rows past the end are
/// left as they are (their lanes encode nothing). `vec`: src is 16-byte aligned (else the copy
/// is synchronous, by floats).
template <int D>
__device__ __forceinline__ void encode_load_tile(float (&rows)[kEncodeTile][D + 4],
                                                 const float* src, long long tile, long long items,
                                                 bool vec, int lane) {
    constexpr int kChunks = D / 4;  // 16-byte chunks per row
#pragma unroll 1
    for (int k = 0; k < kChunks; ++k) {
        const int c = k * 32 + lane, r = c / kChunks, col = (c % kChunks) * 4;
        const long long item = tile * kEncodeTile + r;
        if (item >= items) continue;
        const float* g = src + item * D + col;
        if (vec) {
            cp_async_16(&rows[r][col], g);
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) rows[r][col + i] = g[i];
        }
    }
    cp_async_commit();
}

/// x = R x without the sign flip: the CPU's fwht_orthonormal (butterflies len = 1, 2, 4, ...,
/// a + b then a - b, then the scale), on one thread's registers.
template <int D>
__device__ __forceinline__ void thread_fwht(float (&x)[D], float inv_sqrt_d) {
#pragma unroll
    for (int len = 1; len < D; len <<= 1) {
#pragma unroll
        for (int i = 0; i < D; ++i) {
            if ((i & len) == 0) {
                const float a = x[i], b = x[i + len];
                x[i] = __fadd_rn(a, b);
                x[i + len] = __fsub_rn(a, b);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < D; ++i) x[i] = __fmul_rn(x[i], inv_sqrt_d);
}

/// x *= signs (+-1; 16-byte aligned: the tables are 256-byte aligned, rows D floats).
template <int D>
__device__ __forceinline__ void apply_signs(float (&x)[D], const float* signs) {
#pragma unroll
    for (int j = 0; j < D; j += 4) {
        const float4 s = __ldg(reinterpret_cast<const float4*>(signs + j));
        x[j] = __fmul_rn(x[j], s.x);
        x[j + 1] = __fmul_rn(x[j + 1], s.y);
        x[j + 2] = __fmul_rn(x[j + 2], s.z);
        x[j + 3] = __fmul_rn(x[j + 3], s.w);
    }
}

/// The CPU's norm accumulation: sum over j = 0..D-1 in order of double(x_j) * x_j. The product
/// of two floats is exact in double, so the fused multiply-add rounds exactly where the CPU's
/// separate multiply and add do.
template <int D>
__device__ __forceinline__ double sequential_sq(const float (&x)[D]) {
    double sq = 0.0;
#pragma unroll
    for (int j = 0; j < D; ++j) sq = fma(static_cast<double>(x[j]), static_cast<double>(x[j]), sq);
    return sq;
}

/// A B-bit codebook (2^B centroids, 2^B - 1 ascending boundaries) and its nearest-centroid
/// search: the number of boundaries below x, which both CPU binary searches return (ties go to
/// the lower cell). B <= 2 keeps the codebook in registers and selects; B >= 3 searches the
/// shared copy with the key codec's binary search.
template <int B>
struct EncodeCodebook {
    const float* c;  // shared memory
    const float* b;
    __device__ __forceinline__ EncodeCodebook(const float* centroids, const float* boundaries)
        : c(centroids), b(boundaries) {}
    __device__ __forceinline__ int index(float x) const {
        int idx = 0;
#pragma unroll
        for (int step = (1 << B) >> 1; step > 0; step >>= 1)
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

/// Puts index j of an LSB-first stream of B-bit indices into words w (j compile-time after
/// unrolling); a 3-bit index may straddle two words.
template <int B, int W>
__device__ __forceinline__ void pack_index(uint32_t (&w)[W], int j, int idx) {
    const int bit = j * B;
    w[bit / 32] |= static_cast<uint32_t>(idx) << (bit % 32);
    if (bit % 32 + B > 32) w[bit / 32 + 1] |= static_cast<uint32_t>(idx) >> (32 - bit % 32);
}

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

/// One key stage: quantizes u (in place to the residual u - C[idx], as the CPU), packs the
/// indices LSB-first (pack_bits' stream) and stores them at dst.
template <int B, int D>
__device__ __forceinline__ void encode_key_stage(float (&u)[D], const float* centroids,
                                                 const float* boundaries, uint8_t* dst) {
    const EncodeCodebook<B> cb(centroids, boundaries);
    uint32_t w[D * B / 32] = {};
#pragma unroll
    for (int j = 0; j < D; ++j) {
        const int idx = cb.index(u[j]);
        u[j] = __fsub_rn(u[j], cb.centroid(idx));
        pack_index<B>(w, j, idx);
    }
    store_words(dst, w);
}

/// Value codes of B bits: idx_j of u_j = y_j * inv (y = R v) and the least-squares scale
/// ||v|| <u, c> / ||c||^2 with the CPU's sequential double sums.
template <int B, int D>
__device__ __forceinline__ float encode_value_codes(const float (&y)[D], float inv, double vnorm,
                                                    const float* centroids, const float* boundaries,
                                                    uint8_t* dst) {
    const EncodeCodebook<B> cb(centroids, boundaries);
    uint32_t w[D * B / 32] = {};
    double uc = 0.0, cc = 0.0;
#pragma unroll
    for (int j = 0; j < D; ++j) {
        const float u = __fmul_rn(y[j], inv);
        const int idx = cb.index(u);
        const double c = cb.centroid(idx);
        // Both products are of two floats, exact in double: the fused adds round as the CPU's.
        uc = fma(static_cast<double>(u), c, uc);
        cc = fma(c, c, cc);
        pack_index<B>(w, j, idx);
    }
    store_words(dst, w);
    return cc > 0.0 ? static_cast<float>(vnorm * uc / cc) : 0.0f;
}

template <int D>
__device__ __forceinline__ void encode_keys(float (&x)[D], const EncodeArgs& a,
                                            const EncodeShared<D>& sh, uint8_t* block, int h,
                                            int slot) {
    const TqPageLayout& L = a.layout;
    // n = ||k|| (double, as the CPU), u = R k / n, then each stage quantizes the residual.
    const float norm = static_cast<float>(sqrt(sequential_sq(x)));
    apply_signs(x, a.tables.key_signs + h * D);
    thread_fwht(x, a.tables.inv_sqrt_d);
#pragma unroll
    for (int j = 0; j < D; ++j) x[j] = norm > 0.0f ? __fdiv_rn(x[j], norm) : 0.0f;
    uint8_t* code = block + slot * L.key_code_bytes;
    for (int s = 0; s < L.key_stages; ++s) {
        const float* c = sh.key_centroids + s * 16;
        const float* b = sh.key_boundaries + s * 15;
        uint8_t* dst = code + s * L.key_stage_bytes;
        switch (L.key_bits) {
            case 1:
                encode_key_stage<1>(x, c, b, dst);
                break;
            case 2:
                encode_key_stage<2>(x, c, b, dst);
                break;
            case 3:
                encode_key_stage<3>(x, c, b, dst);
                break;
            default:
                encode_key_stage<4>(x, c, b, dst);
                break;
        }
    }
    reinterpret_cast<float*>(block + L.key_norms_offset)[slot] = norm;
}

template <int D>
__device__ __forceinline__ void encode_values(float (&x)[D], const EncodeArgs& a,
                                              const EncodeShared<D>& sh, uint8_t* block, int h,
                                              int slot) {
    const TqPageLayout& L = a.layout;
    uint8_t* vcode = block + L.value_codes_offset + slot * L.value_code_bytes;
    if (L.value_bits == 16) {  // fp16 pairs as halves (no integer view of the conversion)
#pragma unroll
        for (int k = 0; k < D / 2; ++k)
            reinterpret_cast<__half2*>(vcode)[k] =
                __halves2half2(__float2half_rn(x[2 * k]), __float2half_rn(x[2 * k + 1]));
        return;
    }
    // R v / ||v|| quantized with one least-squares scale per token; all-zero codes for v = 0.
    const double vnorm = sqrt(sequential_sq(x));
    float scale = 0.0f;
    if (vnorm > 0.0) {
        apply_signs(x, a.tables.value_signs + h * D);
        thread_fwht(x, a.tables.inv_sqrt_d);
        const float inv = static_cast<float>(1.0 / vnorm);
        const float* c = sh.value_centroids;
        const float* b = sh.value_boundaries;
        switch (L.value_bits) {
            case 1:
                scale = encode_value_codes<1>(x, inv, vnorm, c, b, vcode);
                break;
            case 2:
                scale = encode_value_codes<2>(x, inv, vnorm, c, b, vcode);
                break;
            default:
                scale = encode_value_codes<4>(x, inv, vnorm, c, b, vcode);
                break;
        }
    } else {
        for (uint32_t k = 0; k < L.value_code_bytes / 4; ++k)
            reinterpret_cast<uint32_t*>(vcode)[k] = 0;
    }
    reinterpret_cast<float*>(block + L.value_scales_offset)[slot] = scale;
}

/// One warp per block; blocks loop over the tiles (the launcher sizes the grid to residency).
template <int D>
__global__ void __launch_bounds__(32) encode_kernel(const EncodeArgs a) {
    __shared__ EncodeShared<D> sh;
    const TqPageLayout& L = a.layout;
    const TqDeviceTables& T = a.tables;
    const int lane = threadIdx.x;
    const int levels = 1 << L.key_bits;
    for (int i = lane; i < L.key_stages * 16; i += 32) {
        const int s = i / 16, k = i % 16;
        if (k < levels) sh.key_centroids[i] = T.key_centroids[s * levels + k];
        if (k < levels - 1) sh.key_boundaries[s * 15 + k] = T.key_boundaries[s * (levels - 1) + k];
    }
    if (L.value_bits != 16) {
        const int vlevels = 1 << L.value_bits;
        if (lane < vlevels) sh.value_centroids[lane] = T.value_centroids[lane];
        if (lane < vlevels - 1) sh.value_boundaries[lane] = T.value_boundaries[lane];
    }
    const long long items = static_cast<long long>(L.num_kv_heads) * a.n_tokens;
    const long long tiles = (items + kEncodeTile - 1) / kEncodeTile;
    const bool vec =
        ((reinterpret_cast<uintptr_t>(a.keys) | reinterpret_cast<uintptr_t>(a.values)) & 15) == 0;
    long long tile = blockIdx.x;
    // Copy groups in flight at the top of each iteration: this tile's keys, then its values.
    encode_load_tile<D>(sh.rows[0], a.keys, tile, items, vec, lane);
    encode_load_tile<D>(sh.rows[1], a.values, tile, items, vec, lane);
    for (; tile < tiles; tile += gridDim.x) {
        const long long item = tile * kEncodeTile + lane;
        const bool valid = item < items;
        const int h = static_cast<int>(item / a.n_tokens), pos = a.start + item % a.n_tokens;
        uint8_t* block = valid ? head_block(a.pool, a.page_table, L, pos, h) : nullptr;
        const int slot = pos % kPage;
        float x[D];
#pragma unroll
        for (int part = 0; part < 2; ++part) {
            cp_async_wait(1);  // this part's rows have landed (the other part may be in flight)
            __syncwarp();
#pragma unroll
            for (int j = 0; j < D; j += 4)
                *reinterpret_cast<float4*>(&x[j]) =
                    *reinterpret_cast<const float4*>(&sh.rows[part][lane][j]);
            __syncwarp();  // every lane has its row: the buffer takes the next tile's part
            encode_load_tile<D>(sh.rows[part], part == 0 ? a.keys : a.values, tile + gridDim.x,
                                items, vec, lane);
            if (!valid) continue;
            if (part == 0)
                encode_keys(x, a, sh, block, h, slot);
            else
                encode_values(x, a, sh, block, h, slot);
        }
    }
    cp_async_wait(0);
}

// ---------------------------------------------------------------------------------------------
// Dequantize: one warp per (head, token); the CPU decode's operations in its order.

template <int D>
__global__ void __launch_bounds__(kEncodeWarps * 32) dequantize_kernel(const DequantizeArgs a) {
    constexpr int E = D / 32;
    const int lane = threadIdx.x & 31;
    const int item = blockIdx.x * kEncodeWarps + (threadIdx.x >> 5);
    if (item >= a.layout.num_kv_heads * a.n_tokens) return;
    const TqPageLayout& L = a.layout;
    const TqDeviceTables& T = a.tables;
    const int h = item / a.n_tokens, t = item % a.n_tokens, pos = a.start + t;
    const uint8_t* block = head_block(const_cast<uint8_t*>(a.pool), a.page_table, L, pos, h);
    const int slot = pos % kPage;
    const size_t dst = (static_cast<size_t>(h) * a.n_tokens + t) * D + lane * E;

    float x[E];
    const uint8_t* kcode = block + slot * L.key_code_bytes;
    const int levels = 1 << L.key_bits;
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = 0.0f;
    for (int s = 0; s < L.key_stages; ++s)
#pragma unroll
        for (int e = 0; e < E; ++e)
            x[e] = __fadd_rn(x[e],
                             T.key_centroids[s * levels + read_packed(kcode + s * L.key_stage_bytes,
                                                                      lane * E + e, L.key_bits)]);
    warp_fwht<E>(x, lane, T.inv_sqrt_d);
    const float norm = reinterpret_cast<const float*>(block + L.key_norms_offset)[slot];
#pragma unroll
    for (int e = 0; e < E; ++e)
        a.keys[dst + e] = __fmul_rn(__fmul_rn(x[e], T.key_signs[h * D + lane * E + e]), norm);

    const uint8_t* vcode = block + L.value_codes_offset + slot * L.value_code_bytes;
    if (L.value_bits == 16) {
#pragma unroll
        for (int e = 0; e < E; ++e)
            a.values[dst + e] = __half2float(reinterpret_cast<const __half*>(vcode)[lane * E + e]);
        return;
    }
    const float scale = reinterpret_cast<const float*>(block + L.value_scales_offset)[slot];
#pragma unroll
    for (int e = 0; e < E; ++e)
        x[e] = __fmul_rn(scale, T.value_centroids[read_packed(vcode, lane * E + e, L.value_bits)]);
    warp_fwht<E>(x, lane, T.inv_sqrt_d);
#pragma unroll
    for (int e = 0; e < E; ++e)
        a.values[dst + e] = __fmul_rn(x[e], T.value_signs[h * D + lane * E + e]);
}

// ---------------------------------------------------------------------------------------------
// Merge: one warp per (sequence, query head).

template <int D>
__global__ void __launch_bounds__(128) merge_kernel(const DecodeKernelParams kp) {
    constexpr int E = D / 32;
    const DecodeArgs& a = kp.args;
    const TqPageLayout& L = a.layout;
    const int lane = threadIdx.x & 31;
    const int num_q = L.num_kv_heads * a.group;
    const int item = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (item >= a.batch * num_q) return;
    const int b = item / num_q, qh = item % num_q, kvh = qh / a.group, h = qh % a.group;
    const size_t unit = (static_cast<size_t>(b) * L.num_kv_heads + kvh) * kp.splits;
    float m = -INFINITY;
    for (int s = lane; s < kp.splits; s += 32)
        m = fmaxf(m, kp.partial_ml[(unit + s) * a.group + h].x);
    m = warp_max(m);
    float x[E] = {};
    float l = 0.0f;
    if (m != -INFINITY) {
        for (int s = 0; s < kp.splits; ++s) {
            const float2 ml = kp.partial_ml[(unit + s) * a.group + h];
            if (ml.y == 0.0f) continue;
            const float f = exp2f(ml.x - m);
            l += f * ml.y;
            const float* po = kp.partial_o + ((unit + s) * a.group + h) * D + lane * E;
#pragma unroll
            for (int e = 0; e < E; ++e) x[e] += f * po[e];
        }
    }
    if (L.value_bits != 16) {  // back from the value rotation's domain: x = R^T acc
        warp_fwht<E>(x, lane, a.tables.inv_sqrt_d);
#pragma unroll
        for (int e = 0; e < E; ++e) x[e] *= a.tables.value_signs[kvh * D + lane * E + e];
    }
    float* out = a.out + (static_cast<size_t>(b) * num_q + qh) * D + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) out[e] = l > 0.0f ? x[e] / l : 0.0f;
}

}  // namespace veloxquant::cuda::kernels
