// Kernels of centred keys on the device (center_keys; the CPU's methods/centered_key_codec.h has
// the math): the pre-RoPE mean of a first append, keys minus (or plus) their blocks' centres
//     c_b = sum over pair i of mu_i A_i exp(j 64 b w_i)   (coordinates from 2P on: mu itself),
// and the per-page score offsets <q, c_b> of a decode, in the log2 units of its logits.
//
// Phases: the angle w * x is formed and reduced modulo 2 pi in double, then turned by the fast
// float sincos, so that blocks far into a long context keep the CPU tables' accuracy (~1e-6)
// on GPUs whose double throughput is low (a double sincos per pair and block would not be).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/ptx_wrappers.cuh"
#include "cuda/warp_reduce.cuh"
#include "methods/key_codec.h"

namespace veloxquant::cuda::kernels {

constexpr int kCenterBlock = 64;     // positions per centre (CenteredKeyCodec::kBlock)
constexpr int kBiasPages = 32;       // pages (blocks) per CTA of the offsets
constexpr int kBiasHeads = 32;       // query heads per CTA of the offsets
constexpr int kCenterMaxPairs = 64;  // the most pairs (head_dim <= 128)
constexpr int kCenterThreads = 256;
static_assert(kCenterThreads == (kBiasHeads / 2) * (kBiasPages / 2),
              "a page-bias thread sums 2 heads x 2 pages");

/// The device parameters of one cache's centring.
struct KeyCenterView {
    int heads = 0;                     ///< KV heads
    int dim = 0;                       ///< head_dim (even)
    int pairs = 0;                     ///< turned pairs P (0: no RoPE, the centre is the mean)
    bool half_split = false;           ///< pair i is (i, i + P), else (2i, 2i + 1)
    const double* inv_freq = nullptr;  ///< [pairs]
};

__device__ __forceinline__ int pair_re(const KeyCenterView& c, int i) {
    return c.half_split ? i : 2 * i;
}
__device__ __forceinline__ int pair_im(const KeyCenterView& c, int i) {
    return c.half_split ? i + c.pairs : 2 * i + 1;
}

/// exp(j w x) as (cos, sin), the angle reduced in double.
__device__ __forceinline__ float2 rope_phase(double w, double x) {
    constexpr double kTwoPi = 6.283185307179586476925286766559;
    double a = w * x;
    a -= kTwoPi * rint(a * (1.0 / kTwoPi));
    float s, c;
    sincosf(static_cast<float>(a), &s, &c);
    return make_float2(c, s);
}

/// Unit u of a head: pair u (u < P), or coordinates 2P + 2(u - P) and the next one.
__device__ __forceinline__ void unit_coords(const KeyCenterView& c, int u, int& x, int& y) {
    if (u < c.pairs) {
        x = pair_re(c, u), y = pair_im(c, u);
    } else {
        x = 2 * c.pairs + 2 * (u - c.pairs), y = x + 1;
    }
}

/// mean [heads][dim]: the average over rows training_row(r, n, m), r < m, of keys [heads][n][dim]
/// (positions 0 .. n - 1) turned back by their positions, in double. Grid (heads, dim / 2): one
/// CTA per head and unit.
__global__ void __launch_bounds__(kCenterThreads)
    estimate_key_mean_kernel(KeyCenterView c, const float* keys, int n, int m, float* mean) {
    const int h = blockIdx.x, u = blockIdx.y;
    int x, y;
    unit_coords(c, u, x, y);
    const bool turned = u < c.pairs;
    double ax = 0.0, ay = 0.0;
    for (int r = threadIdx.x; r < m; r += blockDim.x) {
        const int64_t row = training_row(r, n, m);
        const float* k = keys + (static_cast<size_t>(h) * n + row) * c.dim;
        const float kx = k[x], ky = k[y];
        if (turned) {  // (kx + j ky) exp(-j w row)
            const float2 p = rope_phase(c.inv_freq[u], static_cast<double>(row));
            ax += kx * p.x + ky * p.y;
            ay += ky * p.x - kx * p.y;
        } else {
            ax += kx;
            ay += ky;
        }
    }
    __shared__ double part[2][kCenterThreads / 32];
    ax = warp_sum(ax);
    ay = warp_sum(ay);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) part[0][warp] = ax, part[1][warp] = ay;
    __syncthreads();
    if (threadIdx.x == 0) {
        double sx = 0.0, sy = 0.0;
        for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w)
            sx += part[0][w], sy += part[1][w];
        mean[static_cast<size_t>(h) * c.dim + x] = static_cast<float>(sx / m);
        mean[static_cast<size_t>(h) * c.dim + y] = static_cast<float>(sy / m);
    }
}

/// out[b][h][t] = keys[b][h][t] + sign * c_blk(b, h) for the block blk of position pos0 + t
/// (sequence b's pos0: starts[b], or `pos0` where starts is null) of each sequence b; damped[b]
/// that sequence's [heads][dim] (mu_i A_i, mu elsewhere). One thread per (sequence, head, token,
/// unit), `units` of them; out may be keys. Index: the type of the thread index, 32-bit where
/// `units` allows (its divisions cost the 64-bit kernel 11% at 32K tokens x 8 heads on an H100,
/// bench/results/cuda_h100_20261205zx_shift_keys_probe.txt).
template <typename Index>
__global__ void __launch_bounds__(kCenterThreads)
    shift_keys_kernel(KeyCenterView c, const float* const* damped, const int32_t* starts, int pos0,
                      const float* keys, float* out, int n, Index units, float sign) {
    const Index head_units = static_cast<Index>(c.dim / 2);
    const Index at = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (at >= units) return;
    const int u = static_cast<int>(at % head_units);
    const Index row = at / head_units;  // (b * heads + h) * n + t
    const int t = static_cast<int>(row % static_cast<Index>(n));
    const Index bh = row / static_cast<Index>(n);
    const int h = static_cast<int>(bh % static_cast<Index>(c.heads));
    const int b = static_cast<int>(bh / static_cast<Index>(c.heads));
    const int start = starts != nullptr ? starts[b] : pos0;
    int x, y;
    unit_coords(c, u, x, y);
    const float* d = damped[b] + static_cast<size_t>(h) * c.dim;
    float cx = d[x], cy = d[y];
    if (u < c.pairs) {
        const int64_t block = (static_cast<int64_t>(start) + t) / kCenterBlock;
        const float2 p = rope_phase(c.inv_freq[u], static_cast<double>(kCenterBlock * block));
        const float nx = cx * p.x - cy * p.y;
        cy = cx * p.y + cy * p.x;
        cx = nx;
    }
    const float* k = keys + static_cast<size_t>(row) * c.dim;
    float* o = out + static_cast<size_t>(row) * c.dim;
    o[x] = k[x] + sign * cx;
    o[y] = k[y] + sign * cy;
}

/// shift_keys_kernel over `sequences` sequences of n tokens, 32-bit indexed where the count allows.
inline cudaError_t launch_shift_keys(const KeyCenterView& c, const float* const* damped,
                                     const int32_t* starts, int pos0, const float* keys, float* out,
                                     int n, int sequences, float sign, cudaStream_t stream) {
    const size_t units = static_cast<size_t>(sequences) * c.heads * n * (c.dim / 2);
    const unsigned blocks = static_cast<unsigned>((units + kCenterThreads - 1) / kCenterThreads);
    if (units + kCenterThreads <= UINT32_MAX)
        shift_keys_kernel<uint32_t><<<blocks, kCenterThreads, 0, stream>>>(
            c, damped, starts, pos0, keys, out, n, static_cast<uint32_t>(units), sign);
    else
        shift_keys_kernel<size_t><<<blocks, kCenterThreads, 0, stream>>>(c, damped, starts, pos0,
                                                                         keys, out, n, units, sign);
    return cudaGetLastError();
}

/// cos(64 p w_i) and sin(64 p w_i) of each pair i and page p < stride, the page factor of the
/// offsets below: in pair rows [2P][stride] (rows 2i and 2i + 1) or, page_rows, in page rows
/// [stride][P] of float2 (PhaseLayout). They depend on the page alone, so a cache computes them
/// once for its capacity instead of at every decode. One thread per (pair, page).
__global__ void __launch_bounds__(kCenterThreads)
    page_phase_kernel(KeyCenterView c, float* phases, int stride, bool page_rows) {
    const size_t at = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (at >= static_cast<size_t>(c.pairs) * stride) return;
    const int i = static_cast<int>(at / stride), page = static_cast<int>(at % stride);
    const float2 z = rope_phase(c.inv_freq[i], static_cast<double>(kCenterBlock) * page);
    if (page_rows) {
        reinterpret_cast<float2*>(phases)[static_cast<size_t>(page) * c.pairs + i] = z;
    } else {
        phases[static_cast<size_t>(2 * i) * stride + page] = z.x;
        phases[static_cast<size_t>(2 * i + 1) * stride + page] = z.y;
    }
}

/// The page offsets of a decode: bias[b][qh][page] = log2_scale <q_{b,qh}, c_page(b, qh / group)>
/// for each page of sequence b (seq_lens[b] tokens, or seq_len), queries [batch][q_heads][dim],
/// damped[b] the sequence's [heads][dim]. With W_i = conj(q_i) d_i (CenteredKeyCodec::
/// prepare_query) the offsets are a small product, [heads][2P] x [2P][pages]: rows (Re W_i,
/// -Im W_i) against page_phase_kernel's rows (cos, sin), plus <q, mu> over the unturned
/// coordinates. Grid (page tiles of kBiasPages, batch, query-head tiles of kBiasHeads); each CTA
/// stages both factors in shared memory, and each thread sums 2 heads x 2 pages. It lets the decode
/// (its programmatic dependent on sm_90) launch at once, so that the decode's set-up overlaps this
/// kernel.
__global__ void __launch_bounds__(kCenterThreads)
    page_bias_kernel(KeyCenterView c, const float* phases, int phase_stride,
                     const float* const* damped, const float* queries, int q_heads, int group,
                     const int32_t* seq_lens, int seq_len, float log2_scale, float* bias,
                     int bias_stride) {
    allow_dependent_grid_launch();
    __shared__ __align__(16) float wk[2 * kCenterMaxPairs][kBiasHeads];  // W rows
    __shared__ __align__(16) float ph[2 * kCenterMaxPairs][kBiasPages];  // phase rows
    __shared__ float unturned[kBiasHeads];                               // <q, mu> beyond 2P
    const int b = blockIdx.y, page0 = blockIdx.x * kBiasPages, head0 = blockIdx.z * kBiasHeads;
    const int len = seq_lens != nullptr ? seq_lens[b] : seq_len;
    const int pages = (len + kCenterBlock - 1) / kCenterBlock;
    if (page0 >= pages) return;
    const int P = c.pairs;
    const float* dm = damped[b];
    auto query = [&](int hh) {
        return queries + (static_cast<size_t>(b) * q_heads + min(head0 + hh, q_heads - 1)) * c.dim;
    };
    auto mean_of = [&](int hh) {
        return dm + static_cast<size_t>(min(head0 + hh, q_heads - 1) / group) * c.dim;
    };
    // W: consecutive threads take consecutive pairs of a head (coalesced reads).
    for (int e = threadIdx.x; e < kBiasHeads * P; e += kCenterThreads) {
        const int i = e % P, hh = e / P;
        const float *q = query(hh), *d = mean_of(hh);
        const float qr = __ldg(q + pair_re(c, i)), qi = __ldg(q + pair_im(c, i));
        const float dr = __ldg(d + pair_re(c, i)), di = __ldg(d + pair_im(c, i));
        wk[2 * i][hh] = qr * dr + qi * di;
        wk[2 * i + 1][hh] = -(qr * di - qi * dr);
    }
    // The phase rows of this tile's pages (the table spans whole tiles: KeyCenter::reserve_pages).
    constexpr int kQuads = kBiasPages / 4;
    for (int e = threadIdx.x; e < 2 * P * kQuads; e += kCenterThreads) {
        const int k = e / kQuads, p4 = e % kQuads;
        *reinterpret_cast<float4*>(&ph[k][4 * p4]) = __ldg(reinterpret_cast<const float4*>(
            phases + static_cast<size_t>(k) * phase_stride + page0 + 4 * p4));
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int hh = warp; hh < kBiasHeads; hh += kCenterThreads / 32) {
        const float *q = query(hh), *d = mean_of(hh);
        float s = 0.0f;
        for (int j = 2 * P + lane; j < c.dim; j += 32) s += __ldg(q + j) * __ldg(d + j);
        s = warp_sum(s);
        if (lane == 0) unturned[hh] = s;
    }
    __syncthreads();
    // This thread's 2 heads x 2 pages.
    const int hp = threadIdx.x / (kBiasPages / 2), pp = threadIdx.x % (kBiasPages / 2);
    float acc[2][2];
    for (int r = 0; r < 2; ++r) acc[r][0] = acc[r][1] = unturned[2 * hp + r];
    for (int k = 0; k < 2 * P; ++k) {
        const float2 w = *reinterpret_cast<const float2*>(&wk[k][2 * hp]);
        const float2 z = *reinterpret_cast<const float2*>(&ph[k][2 * pp]);
        acc[0][0] += w.x * z.x, acc[0][1] += w.x * z.y;
        acc[1][0] += w.y * z.x, acc[1][1] += w.y * z.y;
    }
    for (int r = 0; r < 2; ++r) {
        const int qh = head0 + 2 * hp + r;
        if (qh >= q_heads) continue;
        float* out = bias + (static_cast<size_t>(b) * q_heads + qh) * bias_stride;
        for (int x = 0; x < 2; ++x) {
            const int page = page0 + 2 * pp + x;
            if (page < pages) out[page] = log2_scale * acc[r][x];
        }
    }
}

}  // namespace veloxquant::cuda::kernels
