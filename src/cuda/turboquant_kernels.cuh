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
#include "cuda/ptx_wrappers.cuh"
#include "cuda/warp_reduce.cuh"

namespace veloxquant::cuda::kernels {

constexpr int kPage = 64;        // tokens per page
constexpr int kDecodeWarps = 4;  // warps per decode CTA (8 for some head_dim 64 kernels): warp w
                                 // takes pages w, w + warps, ...
constexpr int kMaxGroup = 8;     // query heads per KV head
constexpr int kMaxStages = 3;    // turboquant_rvq stages
constexpr int kDequantizeWarps = 8;

/// Decode-kernel arguments the launcher derives from DecodeArgs (split plan, workspace).
struct DecodeKernelParams {
    DecodeArgs args;
    DecodeSplit split;             // each sequence's page ranges (decode_split.h)
    int ring = 0;                  // pages in flight per warp (cp.async ring depth), 1..4
    uint64_t page_policy = 0;      // L2 policy of the page copies (kL2Evict*)
    bool shared_pairs = false;     // 4-bit values read the lane copies of the 4-bit key table
    float* partial_o = nullptr;    // [batch][kv head][split][group][head_dim]
    float2* partial_ml = nullptr;  // [batch][kv head][split][group] (max, sum) in log2 units
};

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
/// parts with HILO; or, in D/32 tiles of dimension pairs, HILO only, dimension g D/8 + 4v + r + 2c
/// in row r's column c of head t) and the running max and sum of each slot's head, merge through
/// `states` (decode_states_bytes, over the rings) into the split's partial (m, l, o) at `partial`.
/// l_run holds sums of p'' = pair_scale p; the thread is lane (g, t) of warp `warp`.
template <int D, bool HILO, int WARPS, int SLOTS, int TILES>
__device__ __forceinline__ void write_split_state(float* states, const float (&o)[TILES][4],
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
    static_assert(TILES == D / 16 || (TILES == D / 32 && HILO), "tiles of 16 dimensions or pairs");
#pragma unroll
    for (int v = 0; v < TILES; ++v) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int dim = g * (D / 8) + (TILES == D / 32 ? 4 * v : 2 * v) + r;
            if (TILES == D / 32) {
                if (t < G) {
                    wo[(warp * G + t) * D + dim] = o[v][2 * r];
                    wo[(warp * G + t) * D + dim + 2] = o[v][2 * r + 1];
                }
            } else if (HILO) {
                if (t < G) wo[(warp * G + t) * D + dim] = o[v][2 * r] + o[v][2 * r + 1];
            } else {
                const int h0 = heads[0], h1 = heads[SLOTS - 1];
                if (h0 < G) wo[(warp * G + h0) * D + dim] = o[v][2 * r];
                if (h1 < G) wo[(warp * G + h1) * D + dim] = o[v][2 * r + 1];
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
// w + W, ... (lane = E coordinates), four splits' loads in flight at once, the first four beside
// the loads of the splits' maxima; warp 0 then adds the warps' sums in warp order, rotates back
// and normalizes. (One warp per head, waiting on each split's (m, l) before loading its row, took
// ~2 L2 round trips per split: 26.6 us under ncu at 49 splits, one sequence of 128K tokens;
// loading the first splits' rows after the maxima cost a round trip: 0.0108 -> 0.0103 ms at one
// sequence of 8K, cuda_h200_20261204zi_merge_one_round_ab.txt.)

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
    // The value rotation's signs and scale, which the decode does not write: read before the
    // wait, so that their latency passes while the decode ends.
    float signs[E];
    const bool rotated = L.value_bits != 16;
#pragma unroll
    for (int e = 0; e < E; ++e)
        signs[e] = rotated ? a.tables.value_signs[kvh * D + lane * E + e] : 1.0f;
    const float inv_sqrt_d = a.tables.inv_sqrt_d;
    // Built for sm_90 or newer, the launcher makes this grid a programmatic dependent of the
    // decode, which lets it launch once all the decode's CTAs have started: wait for the
    // decode's partials.
    wait_for_prerequisite_grid();
    // Warp w's round of splits s0, s0 + W, s0 + 2 W, s0 + 3 W (one past the end reads split 0's
    // row and gets no weight). The first round goes out with the loads of the maxima, so that the
    // merge waits on one L2 round trip where the splits are at most 4 W (32; one sequence of
    // 128K takes 33, and a second round).
    float2 mk[kMergeUnroll];
    Row rk[kMergeUnroll];
    auto load_round = [&](int s0) {
#pragma unroll
        for (int k = 0; k < kMergeUnroll; ++k) {
            const int s = s0 + k * warps;
            const size_t at = static_cast<size_t>(s < kp.split.splits ? s : 0) * a.group;
            mk[k] = ml[at];
            rk[k] = *reinterpret_cast<const Row*>(po + at * D);
            if (s >= kp.split.splits) mk[k].y = 0.0f;
        }
    };
    load_round(warp);
    float m = -INFINITY;
    for (int s = lane; s < kp.split.splits; s += 32)
        m = fmaxf(m, ml[static_cast<size_t>(s) * a.group].x);
    m = warp_max(m);
    float x[E] = {};
    float l = 0.0f;
    for (int s0 = warp; m != -INFINITY;) {
#pragma unroll
        for (int k = 0; k < kMergeUnroll; ++k) {
            if (mk[k].y == 0.0f) continue;  // an empty split (its row is 0 or unused)
            const float f = exp2f(mk[k].x - m);
            l += f * mk[k].y;
            const float* r = reinterpret_cast<const float*>(&rk[k]);
#pragma unroll
            for (int e = 0; e < E; ++e) x[e] += f * r[e];
        }
        if ((s0 += kMergeUnroll * warps) >= kp.split.splits) break;
        load_round(s0);
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
    if (rotated) {  // back from the value rotation's domain: x = R^T acc
        warp_fwht<E>(x, lane, inv_sqrt_d);
#pragma unroll
        for (int e = 0; e < E; ++e) x[e] *= signs[e];
    }
    float* out = a.out + (static_cast<size_t>(b) * num_q + qh) * D + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) out[e] = l > 0.0f ? x[e] / l : 0.0f;
}

}  // namespace veloxquant::cuda::kernels
