// Header-only CUDA kernels of the turboquant_rvq key codec and the value codec on the CPU's
// packed page layout (cuda_cache.h, TqPageLayout):
//   dequantize_kernel      one warp per (head, token), bit-identical to the CPU decode
//   write_split_state      the end of a decode CTA: its warps' states merged into its partial
//   merge_kernel           combines the decode's splits and applies the inverse value rotation
// The split-K decode attention kernel itself is in turboquant_decode.cuh, the encoder in
// turboquant_encode.cuh.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/cuda_cache.h"
#include "cuda/decode_split.h"
#include "cuda/warp_reduce.cuh"

namespace veloxquant::cuda::kernels {

constexpr int kPage = 64;        // tokens per page
constexpr int kDecodeWarps = 4;  // warps per decode CTA (8 for some head_dim 64 kernels): warp w
                                 // takes pages w, w + warps, ...
constexpr int kMaxGroup = 8;     // query heads per KV head
constexpr int kMaxStages = 3;    // turboquant_rvq stages
constexpr int kDequantizeWarps = 8;
constexpr unsigned kFull = 0xffffffffu;

/// Decode-kernel arguments the launcher derives from DecodeArgs (split plan, workspace).
struct DecodeKernelParams {
    DecodeArgs args;
    DecodeSplit split;             // each sequence's page ranges (decode_split.h)
    int ring = 0;                  // pages in flight per warp (cp.async ring depth), 1..4
    bool shared_pairs = false;     // 4-bit values read the lane copies of the 4-bit key table
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

/// Integer mma m16n8k32: 8-bit A (row; unsigned, or signed with SIGNED_A), signed 8-bit B
/// (column), int32 accumulators.
template <bool SIGNED_A>
__device__ __forceinline__ void mma_16832_i8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
#if __CUDA_ARCH__ >= 800
    if constexpr (SIGNED_A)
        asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
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

/// The transpose of an 8x8 fp16 matrix across the warp, in registers: thread (g, t) passes row g,
/// columns 2t, 2t + 1 (an mma C fragment's row) and gets rows 2t, 2t + 1 of column g (a B
/// fragment's k pair).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
#if __CUDA_ARCH__ >= 750
    uint32_t y;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
#else
    __trap();
    return 0;
#endif
}

/// An asynchronous copy of BYTES (16: through L2 only, .cg; 4: through L1, as .ca is the only
/// cache mode cp.async takes for fewer than 16 bytes).
template <int BYTES>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem) {
    static_assert(BYTES == 4 || BYTES == 16, "4- or 16-byte copies");
#if __CUDA_ARCH__ >= 800
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    if constexpr (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem) : "memory");
#else
    if constexpr (BYTES == 16)
        *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
    else
        *static_cast<uint32_t*>(smem) = *static_cast<const uint32_t*>(gmem);
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
// Dequantize: one warp per (head, token); the CPU decode's operations in its order.

template <int D>
__global__ void __launch_bounds__(kDequantizeWarps * 32) dequantize_kernel(const DequantizeArgs a) {
    constexpr int E = D / 32;
    const int lane = threadIdx.x & 31;
    const int item = blockIdx.x * kDequantizeWarps + (threadIdx.x >> 5);
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

/// The end of a decode CTA (turboquant_decode.cuh): its warps' online-softmax states, per thread
/// the C fragments o of O^T (rows: dimensions g D/8 + 2v + r; columns: the score columns, hi + lo
/// parts with HILO) and the running max and sum of each slot's head, merge through `states`
/// (decode_states_bytes, over the rings) into the split's partial (m, l, o) at `partial`. l_run
/// holds sums of p'' = pair_scale p; the thread is lane (g, t) of warp `warp`.
template <int D, bool HILO, int WARPS, int SLOTS>
__device__ __forceinline__ void write_split_state(float* states, const float (&o)[D / 16][4],
                                                  const float (&m_run)[SLOTS],
                                                  float (&l_run)[SLOTS], const int (&heads)[SLOTS],
                                                  int G, float pair_scale,
                                                  const DecodeKernelParams& kp, size_t partial,
                                                  int warp, int g, int t) {
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
        l_run[j] *= 1.0f / pair_scale;
        l_run[j] += __shfl_xor_sync(kFull, l_run[j], 4);
        l_run[j] += __shfl_xor_sync(kFull, l_run[j], 8);
        l_run[j] += __shfl_xor_sync(kFull, l_run[j], 16);
    }
    __syncthreads();
    float* wo = states;              // [warp][head][D]
    float* wm = wo + WARPS * G * D;  // [warp][head]
    float* wl = wm + WARPS * G;      // [warp][head]
#pragma unroll
    for (int v = 0; v < D / 16; ++v) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int dim = g * (D / 8) + 2 * v + r;
            if (HILO) {
                if (t < G) wo[(warp * G + t) * D + dim] = o[v][2 * r] + o[v][2 * r + 1];
            } else {
                if (2 * t < G) wo[(warp * G + 2 * t) * D + dim] = o[v][2 * r];
                if (2 * t + 1 < G) wo[(warp * G + 2 * t + 1) * D + dim] = o[v][2 * r + 1];
            }
        }
    }
    if (g == 0) {
#pragma unroll
        for (int j = 0; j < SLOTS; ++j)
            if (heads[j] < G)
                wm[warp * G + heads[j]] = m_run[j], wl[warp * G + heads[j]] = l_run[j];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
        const int h = i / D, dim = i % D;
        float m = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) m = fmaxf(m, wm[w * G + h]);
        float acc = 0.0f, l = 0.0f;
        if (m != -INFINITY) {
#pragma unroll
            for (int w = 0; w < WARPS; ++w) {
                const float f = exp2f(wm[w * G + h] - m);
                acc += f * wo[(w * G + h) * D + dim];
                l += f * wl[w * G + h];
            }
        }
        kp.partial_o[(partial * G + h) * D + dim] = acc;
        if (dim == 0) kp.partial_ml[partial * G + h] = make_float2(m, l);
    }
}

// ---------------------------------------------------------------------------------------------
// Merge: one CTA of up to kMergeWarps warps per (sequence, query head). Warp w sums splits w,
// w + W, ... (lane = E coordinates), four splits' loads in flight at once; warp 0 then adds the
// warps' sums in warp order, rotates back and normalizes. (One warp per head, waiting on each
// split's (m, l) before loading its row, took ~2 L2 round trips per split: 26.6 us under ncu
// at 49 splits, one sequence of 128K tokens.)

constexpr int kMergeWarps = 8;
constexpr int kMergeUnroll = 4;

template <int D>
__global__ void __launch_bounds__(kMergeWarps * 32) merge_kernel(const DecodeKernelParams kp) {
    constexpr int E = D / 32;
    using Row = std::conditional_t<E == 4, float4, float2>;  // a lane's E coordinates
    static_assert(sizeof(Row) == E * sizeof(float), "E = 2 or 4 coordinates per lane");
    __shared__ float part_x[kMergeWarps][D];
    __shared__ float part_l[kMergeWarps];
    const DecodeArgs& a = kp.args;
    const TqPageLayout& L = a.layout;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const int num_q = L.num_kv_heads * a.group;
    const int b = blockIdx.x / num_q, qh = blockIdx.x % num_q, kvh = qh / a.group, h = qh % a.group;
    const size_t first =
        (static_cast<size_t>(b) * L.num_kv_heads + kvh) * kp.split.splits * a.group + h;
    const float2* ml = kp.partial_ml + first;               // split s at s * group
    const float* po = kp.partial_o + first * D + lane * E;  // split s at s * group * D
#if __CUDA_ARCH__ >= 900
    // Built for sm_90 or newer, the launcher makes this grid a programmatic dependent of the
    // decode, so that its launch overlaps the decode's last CTAs: wait for the decode's partials.
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    float m = -INFINITY;
    for (int s = lane; s < kp.split.splits; s += 32)
        m = fmaxf(m, ml[static_cast<size_t>(s) * a.group].x);
    m = warp_max(m);
    float x[E] = {};
    float l = 0.0f;
    if (m != -INFINITY) {
        for (int s0 = warp; s0 < kp.split.splits; s0 += kMergeUnroll * warps) {
            float2 mk[kMergeUnroll];
            Row rk[kMergeUnroll];
#pragma unroll
            for (int k = 0; k < kMergeUnroll; ++k) {
                const int s = s0 + k * warps;
                const size_t at = static_cast<size_t>(s < kp.split.splits ? s : 0) * a.group;
                mk[k] = ml[at];
                rk[k] = *reinterpret_cast<const Row*>(po + at * D);
                if (s >= kp.split.splits) mk[k].y = 0.0f;
            }
#pragma unroll
            for (int k = 0; k < kMergeUnroll; ++k) {
                if (mk[k].y == 0.0f) continue;  // an empty split (its row is 0 or unused)
                const float f = exp2f(mk[k].x - m);
                l += f * mk[k].y;
                const float* r = reinterpret_cast<const float*>(&rk[k]);
#pragma unroll
                for (int e = 0; e < E; ++e) x[e] += f * r[e];
            }
        }
    }
#pragma unroll
    for (int e = 0; e < E; ++e) part_x[warp][lane * E + e] = x[e];
    if (lane == 0) part_l[warp] = l;
    __syncthreads();
    if (warp != 0) return;
    for (int w = 1; w < warps; ++w) {
#pragma unroll
        for (int e = 0; e < E; ++e) x[e] += part_x[w][lane * E + e];
        l += part_l[w];
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
