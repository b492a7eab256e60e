// The generic device path's attention (header-only), after the query states of
// codec_kernels.cuh's prepare kernels:
//   codec_attention_kernel   split-K attention of query rows over the codes: scores on tensor
//                            cores (codec_feature_scores.cuh) or a lane per token, the online
//                            softmax (log2), values on tensor cores (codec_value_mma.cuh)
//   codec_merge_kernel       one CTA per (head, row): merges the splits and maps the value
//                            sum back from the value codec's domain
#pragma once

#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/codec_attention_layout.cuh"
#include "cuda/codec_kernels.cuh"
#include "cuda/outlier_records.cuh"
#include "cuda/ptx_wrappers.cuh"
#include "cuda/warp_reduce.cuh"
#include "device_codecs/device_common.h"
#include "device_codecs/value_device.h"

namespace veloxquant::cuda::codec {

/// Copies the codec's table (if it names one) to shared memory at dst, block-parallel, and
/// points p at the copy; the caller synchronizes before p is used.
template <class C>
__device__ __forceinline__ void stage_table(typename C::Params& p, float* dst) {
    if constexpr (dev::HasTable<C>::value) {
        const float* src = C::table(p);
        for (int i = threadIdx.x; i < C::table_floats(p); i += blockDim.x) dst[i] = src[i];
        C::table(p) = dst;
    }
}

/// Asynchronous copies of G bytes (cp.async on sm_80+): unit i = lane + 32 k of the rows goes to
/// row t = i / units, unit u = i % units, with t and u stepped without a division.
template <int G>
__device__ __forceinline__ void stage_units(uint8_t* dst, int dst_stride, const uint8_t* src,
                                            int row_bytes, int n, int lane) {
    const int units = row_bytes / G, step_rows = 32 / units, step_units = 32 % units;
    int t = lane / units, u = lane % units;
    for (const uint8_t* from = src + G * lane; t < n; from += 32 * G) {
        __pipeline_memcpy_async(dst + t * dst_stride + G * u, from, G);
        t += step_rows;
        u += step_units;
        if (u >= units) u -= units, ++t;
    }
}

/// stage_rows for rows of a size or at an address not a multiple of 4 bytes: the rows' bytes are
/// read in the aligned 4-byte words that hold them (page regions are 64-byte aligned, so such a
/// word lies inside the page), two words a lane at once so that their loads are in flight
/// together, and stored byte by byte to their padded rows. (One byte load and store a lane at a
/// time waited out a memory latency for every 32 bytes: spectral's staging took 40% of its
/// decode's stall samples.)
__device__ __forceinline__ void stage_bytes(uint8_t* dst, int dst_stride, const uint8_t* src,
                                            int row_bytes, int n, int lane) {
    const int off = static_cast<int>(reinterpret_cast<uintptr_t>(src) & 3);
    const uint32_t* words = reinterpret_cast<const uint32_t*>(src - off);
    const int bytes = n * row_bytes, count = (off + bytes + 3) / 4;
    constexpr int kInFlight = 2;
    for (int u0 = lane; u0 < count; u0 += kInFlight * 32) {
        uint32_t w[kInFlight];
#pragma unroll
        for (int k = 0; k < kInFlight; ++k)
            if (u0 + 32 * k < count) w[k] = words[u0 + 32 * k];
#pragma unroll
        for (int k = 0; k < kInFlight; ++k) {
            if (u0 + 32 * k >= count) break;
            // Row t, column col of the word's first byte s0 (before the rows, s0 < 0: col
            // counts up to row 0's start).
            const int s0 = 4 * (u0 + 32 * k) - off;
            int t = s0 >= 0 ? s0 / row_bytes : 0;
            int col = s0 - t * row_bytes;
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                if (s0 + b >= 0 && s0 + b < bytes)
                    dst[t * dst_stride + col] = static_cast<uint8_t>(w[k] >> (8 * b));
                if (++col == row_bytes) col = 0, ++t;
            }
        }
    }
}

/// Copies n rows of row_bytes bytes, consecutive in global memory, to shared memory rows
/// dst_stride bytes apart (dst 16-byte aligned), lane-parallel, in the widest asynchronous
/// copies the addresses and sizes allow, so every lane's loads are in flight at once; the caller
/// waits (stage_wait).
__device__ __forceinline__ void stage_rows(uint8_t* dst, int dst_stride, const uint8_t* src,
                                           int row_bytes, int n, int lane) {
    const unsigned align =
        static_cast<unsigned>(reinterpret_cast<uintptr_t>(src)) | row_bytes | dst_stride;
    if ((align & 15) == 0) return stage_units<16>(dst, dst_stride, src, row_bytes, n, lane);
    if ((align & 7) == 0) return stage_units<8>(dst, dst_stride, src, row_bytes, n, lane);
    if ((align & 3) == 0) return stage_units<4>(dst, dst_stride, src, row_bytes, n, lane);
    stage_bytes(dst, dst_stride, src, row_bytes, n, lane);
}

__device__ __forceinline__ void stage_wait() {
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncwarp();
}

/// Centred keys (CenterParams): pairs a lane sums of a page's <q, c_page>, lane + 32 k (the
/// device centre takes head_dim <= 128: KeyCenter).
constexpr int kCenterPairsPerLane = 2;

/// The phases of `page` for this lane's pairs: (cos, sin) of 64 page w_i.
struct PagePhases {
    float2 z[kCenterPairsPerLane];
};

__device__ __forceinline__ PagePhases load_page_phases(const CenterParams& c, int page, int lane) {
    PagePhases ph;
#pragma unroll
    for (int k = 0; k < kCenterPairsPerLane; ++k) {
        const int i = lane + 32 * k;
        ph.z[k] = make_float2(0.0f, 0.0f);
        if (i < c.pairs) ph.z[k] = c.phases[static_cast<size_t>(page) * c.pairs + i];
    }
    return ph;
}

/// p[r] += <q_r, c_page> = sum_i (Re W_i cos - Im W_i sin) + <q_r, mu> over the unturned
/// coordinates (CenteredKeyCodec::score_rows_at), W from the rows' states in shared memory
/// ([S][R]); lanes over pairs, then the rows' warp sums in one reduce-scatter (warp_sum_rows:
/// 2R + 4 - log2 R shuffles instead of 5R). Warp-uniform.
template <int R>
__device__ __forceinline__ void add_page_center(const CenterParams& c, const float* states,
                                                const PagePhases& ph, int lane, float (&p)[R]) {
    const int P = c.pairs;
    const float* w = states + c.offset * R;
    float b[R] = {};
#pragma unroll
    for (int k = 0; k < kCenterPairsPerLane; ++k) {
        const int i = lane + 32 * k;
        if (i >= P) break;
        float re[R], im[R];
        dev::load_rows<R>(w + i * R, re);
        dev::load_rows<R>(w + (P + i) * R, im);
#pragma unroll
        for (int r = 0; r < R; ++r) b[r] += re[r] * ph.z[k].x - im[r] * ph.z[k].y;
    }
    warp_sum_rows<R>(b, lane);
    float rest[R];
    dev::load_rows<R>(w + 2 * P * R, rest);
#pragma unroll
    for (int r = 0; r < R; ++r) p[r] += b[r] + rest[r];
}

// grid (splits, units, row blocks), R rows per CTA (a.rows_per_block <= R; unused rows have
// zero states and no tokens). Scores: on tensor cores for the codecs of codec_feature_scores.cuh
// (a tile of 16 tokens' features times the rows' fp16 states), else lane = token, one pass over
// the token's code scoring every row (Codec::score<R>). The online softmax (log2 units, lane =
// token) turns them into the chunk's weights, and the value sum is the tensor cores'
// (codec_value_mma.cuh): the chunk's value codes decoded into a tile of centroids, 16 tokens at
// a time, times the weights. Shared memory: codec_attention_layout.cuh. MODE (a FeatureMode) is
// the launch's a.feature_scores: one kernel per score path.
// Lane-scored R = 8 kernels (prefill chunks) of D = 128 are held to 128 registers (4 CTAs an SM;
// those of D = 64 use 122-128 anyway, at D = 256 it spills 72-240 bytes: not timed). polarquant's
// and commvq's took 154-167, and their 512-query chunks went from 38.0 and 62.6 ms to 29.0 and
// 55.3 ms with 4-16 bytes of spills (H200, bench/results/cuda_h200_20261201o_prefill_bounds.txt).
// A minimum of 0 leaves the other kernels' SASS as without bounds. A minimum of 1 on the R = 4
// (decode) kernels raised them past 128 registers (decode steps 30-90% slower), a minimum of 5
// cut them to 96 with spills (5-24% slower). CENTRED: centred keys (a.center), each chunk's rows
// shifted by their page's <q, c_page>.
template <class Codec, int D, int R, int MODE, bool CENTRED = false>
__global__ void __launch_bounds__(kWarps * 32, R == 8 && MODE == kLaneScores && D == 128 ? 4 : 0)
    codec_attention_kernel(const AttentionParams<Codec> a) {
    static_assert(R <= kWeightRows, "an mma's 8 columns hold the rows");
    using Features = FeatureScore<Codec>;
    static_assert(MODE == kLaneScores || Features::kAvailable, "lane scores for this codec");
    constexpr int E = D / 32;
    extern __shared__ float4 smem_vec[];  // 16-byte aligned: load_rows reads float4
    uint8_t* smem = reinterpret_cast<uint8_t*>(smem_vec);
    StageSizes sizes = a.stage_sizes();
    if constexpr (!CENTRED) sizes.feature_span = sizes.state_stride;  // (no centre after it)
    const AttentionLayout L = attention_layout<Codec>(R, D, sizes, kWarps);
    const int span = sizes.feature_span;
    const int split = blockIdx.x, u = blockIdx.y, h = a.head(u);
    const int row0 = blockIdx.z * a.rows_per_block;
    const int rows = min(a.rows_per_block, a.rows - row0);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int S = a.state_stride, d = a.store.d;

    // The codecs' tables in shared memory (looked up for every code field).
    typename Codec::Params kp = a.key_params(u);
    const dev::ValueDevice::Params& vp = a.value_params(u);
    float* key_table = reinterpret_cast<float*>(smem + L.tables);
    stage_table<Codec>(kp, key_table);
    const __half* value_table =
        reinterpret_cast<__half*>(key_table + (a.key_table_floats + 3) / 4 * 4);
    fill_value_table(vp, const_cast<__half*>(value_table));
    const int value_bits = vp.bits;
    const bool scaled = value_bits != 16;

    // This warp's area (reused by the combine below), zeroed: the weights' rows past R and the
    // staged rows of a short first chunk must hold finite numbers.
    uint8_t* area = smem + L.warps + warp * L.area;
    for (size_t i = lane; i < L.area / 16; i += 32) reinterpret_cast<uint4*>(area)[i] = uint4{};
    uint8_t* st_key = area;
    __half* tile = reinterpret_cast<__half*>(area + L.tile);  // [16][D + 8] values (or features)
    uint8_t* st_value = area + L.values;
    float* st_kscal = reinterpret_cast<float*>(area + L.key_scalars);
    float* st_vscal = reinterpret_cast<float*>(area + L.value_scalars);
    __half* weights = reinterpret_cast<__half*>(area + L.weights);  // [8][40]
    float* scores = reinterpret_cast<float*>(area + L.scores);      // [8][36] (features)
    // fp16 values of the kernel's width are their own tile (half_rows_stride pads the rows).
    const bool values_in_place = value_bits == 16 && d == D;
    // The query states, once the prepare kernel has written them: on sm_90 the launcher makes
    // this grid its programmatic dependent, so that it launches as the prepare kernel's CTAs end
    // and the above runs before that grid's writes are flushed. (With the prepare kernel
    // triggering at its start, the attention's CTAs took SM slots beside the prepare's and the
    // one-wave plan gained a tail: polarquant, rabitq, spectral 6-9% slower at 32K; session q.)
    wait_for_prerequisite_grid();
    float* states = reinterpret_cast<float*>(smem);  // [S][R]
    for (int i = threadIdx.x; i < R * S; i += blockDim.x) {
        const int r = i / S, e = i - r * S;  // coalesced global reads
        states[e * R + r] =
            r < rows ? a.states[(static_cast<size_t>(u) * a.rows + row0 + r) * S + e] : 0.0f;
    }
    __syncthreads();  // the states and tables are in place
    // Scores on tensor cores: where the launcher chose them, for every head of the launch.
    int features = 0;  // F padded to 16
    __half* feature_states = reinterpret_cast<__half*>(smem + L.feature_states);
    float* row_scale =
        reinterpret_cast<float*>(feature_states + 2 * kWeightRows * feature_stride(span));
    TileWalk feature_walk(1, lane);  // over (token, group of features) of a tile
    if constexpr (MODE != kLaneScores) {
        features = Features::padded(kp);
        feature_walk = TileWalk(features / Features::kGroup, lane);
        prepare_feature_states<R>(states, span, Codec::feature_offset(kp), Codec::feature_count(kp),
                                  feature_states, row_scale);
        __syncthreads();
    }

    // Each row sees the positions t with window.visible(t, lim); the splits walk the span of
    // held pages (TokenWindow: every position below the limit where there is no window).
    int lim[R];
    int lim_max = 0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        lim[r] = r < rows ? a.limit(u, row0 + r) : 0;
        lim_max = max(lim_max, lim[r]);
    }
    const int gap = a.window.gap(lim[0]);  // AttentionParams::span_gap(u, row0)
    const int t_begin = split * a.tokens_per_split;
    const int t_end = min(t_begin + a.tokens_per_split, lim_max - gap);
    const HeadRegions layout = a.store.regions[h];
    const TileWalk walk = value_tile_walk(static_cast<int>(layout.value_code_bytes), lane);

    // m: the running max (warp-uniform); l: this lane's share of the running sum.
    float m[R], l[R];
#pragma unroll
    for (int r = 0; r < R; ++r) m[r] = -INFINITY, l[r] = 0.0f;
    ValueSum<D> o;
    for (int c0 = t_begin + warp * 32; c0 < t_end; c0 += kWarps * 32) {
        // Stage the chunk (32 consecutive slots of one page: c0 is a multiple of 32, and span
        // tokens map to positions page by page), at positions p0 ...
        const int n = min(32, t_end - c0);
        const int p0 = a.window.position(c0, gap);
        const uint8_t* page = a.page(u, p0);
        const int slot0 = p0 % kPage;
        stage_rows(st_key, a.stage_key_stride,
                   page + layout.key_codes + static_cast<size_t>(slot0) * layout.key_code_bytes,
                   layout.key_code_bytes, n, lane);
        stage_rows(st_value, a.stage_value_stride,
                   page + layout.value_codes + static_cast<size_t>(slot0) * layout.value_code_bytes,
                   layout.value_code_bytes, n, lane);
        if (lane < n) {
            const float* ks =
                reinterpret_cast<const float*>(page + layout.key_scalars) + slot0 + lane;
            for (int s = 0; s < a.stage_key_scalars; ++s) st_kscal[s * 32 + lane] = ks[s * kPage];
            const float* vs =
                reinterpret_cast<const float*>(page + layout.value_scalars) + slot0 + lane;
            for (int s = 0; s < a.stage_value_scalars; ++s) st_vscal[s * 32 + lane] = vs[s * kPage];
        }
        // Centred keys: the page's phases, read while the codes arrive.
        [[maybe_unused]] PagePhases phases;
        if constexpr (CENTRED) phases = load_page_phases(a.center, p0 / kPage, lane);
        stage_wait();
        const int t = p0 + lane;
        float p[R] = {};
        if constexpr (MODE != kLaneScores) {
            for (int k0 = 0; k0 < n; k0 += kTileTokens) {
                const uint8_t* codes = st_key + k0 * a.stage_key_stride;
                if constexpr (MODE == kFeaturesInPlace) {
                    tile_scores(reinterpret_cast<const __half*>(codes), a.stage_key_stride / 2,
                                feature_states, span, features, scores, k0, lane);
                } else {
                    Features::decode_tile(kp, codes, a.stage_key_stride, p0 + k0, tile,
                                          feature_stride(span), feature_walk);
                    __syncwarp();
                    tile_scores(tile, feature_stride(span), feature_states, span, features, scores,
                                k0, lane);
                }
                __syncwarp();  // the next tile overwrites this one; the scores are written
            }
            if (lane < n) {
                const uint8_t* code = st_key + lane * a.stage_key_stride;
                const float f = Codec::feature_factor(st_kscal + lane);
                const int extra = Codec::extra_entry(kp, code);
                float base[R] = {};
                if (extra >= 0) dev::load_rows<R>(states + extra * R, base);
#pragma unroll
                for (int r = 0; r < R; ++r)
                    p[r] = base[r] + scores[r * kScoreStride + lane] * row_scale[r] * f;
            }
        } else if (lane < n) {
            Codec::template score<R>(kp, states, st_key + lane * a.stage_key_stride,
                                     st_kscal + lane, 32, t, p);
        }
        if constexpr (CENTRED) add_page_center<R>(a.center, states, phases, lane, p);
        // Tokens of the outlier side store are scored from it (codec_merge_kernel): the chunk's
        // mask word (p0 is a multiple of 32), read here so that it is not live across the scores.
        uint32_t side = 0u;
        if (a.outliers.active()) {
            const uint32_t* row = a.outliers.mask_row(u, h);
            if (row != nullptr) side = row[p0 / 32];
        }
        const bool in_pages = lane < n && !((side >> lane) & 1u);
        float corr[R], corr_max = 0.0f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            p[r] = in_pages && a.window.visible(t, lim[r]) ? p[r] * a.scale_log2 : -INFINITY;
            const float mx = fmaxf(m[r], warp_max(p[r]));
            corr[r] = 1.0f;
            if (mx == -INFINITY) {  // warp-uniform: no token of this row yet
                p[r] = 0.0f;
            } else {
                corr[r] = exp2f(m[r] - mx);
                p[r] = exp2f(p[r] - mx);
                l[r] = l[r] * corr[r] + p[r];
                m[r] = mx;
                corr_max = fmaxf(corr_max, corr[r]);  // rows without tokens have no sums
            }
        }
        // The token's value scale goes into its weights, relative to the chunk's factor.
        float scale = 1.0f, top = 1.0f;
        if (scaled) {
            scale = lane < n ? st_vscal[lane] : 0.0f;
            top = o.chunk_factor(warp_max(fabsf(scale)), corr_max);
            scale /= top;
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
            weights[r * kWeightStride + lane] = __float2half_rn(p[r] * scale);
        __syncwarp();  // the weights are written, and the staged keys scored (the tile's place)
        o.begin_chunk(corr, top, lane);
        for (int k0 = 0; k0 < n; k0 += kTileTokens) {
            if (values_in_place) {
                o.add_tile(reinterpret_cast<const __half*>(st_value + k0 * a.stage_value_stride),
                           a.stage_value_stride / 2, weights, k0, lane);
            } else {
                decode_value_tile<D>(
                    TileCodes{st_value + k0 * a.stage_value_stride, a.stage_value_stride,
                              static_cast<int>(layout.value_code_bytes), value_bits, d},
                    value_table, tile, walk, lane);
                __syncwarp();
                o.add_tile(tile, tile_stride(D), weights, k0, lane);
            }
            __syncwarp();  // the next tile, or the next chunk's copies, overwrite these
        }
    }

    // Combine the warps: each writes (m, l, o) per row; warps then merge rows and store the split.
#pragma unroll
    for (int r = 0; r < R; ++r) l[r] = warp_sum(l[r]);
    __syncthreads();  // the staging areas are no longer read
    const float* mine = reinterpret_cast<const float*>(smem + L.warps);
    const int slot_floats = static_cast<int>(L.area / sizeof(float));
    float* slot_w = reinterpret_cast<float*>(area);
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (r >= rows) break;
        if (lane == 0) slot_w[r * (D + 2)] = m[r], slot_w[r * (D + 2) + 1] = l[r];
    }
    o.store(slot_w + 2, D + 2, rows, lane);
    __syncthreads();
    const int j0 = lane * E;
    for (int r = warp; r < rows; r += kWarps) {
        float mx = -INFINITY;
        for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, mine[w * slot_floats + r * (D + 2)]);
        float lsum = 0.0f, acc[E] = {};
        if (mx != -INFINITY) {
            for (int w = 0; w < kWarps; ++w) {
                const float* s = mine + w * slot_floats + r * (D + 2);
                if (s[1] == 0.0f) continue;
                const float f = exp2f(s[0] - mx);
                lsum += f * s[1];
#pragma unroll
                for (int e = 0; e < E; ++e)
                    if (j0 + e < d) acc[e] = dev::fmadd(f, s[2 + j0 + e], acc[e]);
            }
        }
        const size_t at = (static_cast<size_t>(u) * a.rows + row0 + r) * a.splits + split;
        if (lane == 0) a.partial_ml[at] = make_float2(mx, lsum);
#pragma unroll
        for (int e = 0; e < E; ++e) a.partial_o[at * D + j0 + e] = acc[e];
    }
}

/// out = R^T acc for the value rotation, from acc in shared memory, by the CTA's threads: for the
/// randomized Hadamard form R^T = diag(signs) H / sqrt(d) with H[j][i] = (-1)^popcount(i & j)
/// (Sylvester order, as fwht_orthonormal), at d = D warp 0's butterflies (warp_fwht, the
/// CPU's operation order); otherwise thread j sums coordinate j over i in the CPU's order
/// (the dense matrix's column j, or the Hadamard signs), eight terms' loads at a time.
template <int D>
__device__ void value_finalize(const dev::ValueDevice::Params& vp, const float* acc, float* out) {
    const int d = vp.d;
    if (vp.bits != 16 && vp.rotation.hadamard && d == D) {
        constexpr int E = D / 32;
        const int lane = threadIdx.x & 31;
        if (threadIdx.x >= 32) return;
        float x[E];
#pragma unroll
        for (int e = 0; e < E; ++e) x[e] = acc[lane * E + e];
        warp_fwht<E>(x, lane, 1.0f / sqrtf(static_cast<float>(d)));
#pragma unroll
        for (int e = 0; e < E; ++e) out[lane * E + e] = x[e] * vp.rotation.signs[lane * E + e];
        return;
    }
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float x = 0.0f;
        if (vp.bits == 16) {
            x = acc[j];
        } else if (vp.rotation.hadamard) {
            for (int i = 0; i < d; ++i) x += (__popc(i & j) & 1) ? -acc[i] : acc[i];
            x *= vp.rotation.signs[j] * rsqrtf(static_cast<float>(d));
        } else {
            const float* column = vp.rotation.matrix + j;
            int i = 0;
            for (; i + 8 <= d; i += 8) {  // in i order; eight terms' loads in flight
                float m[8];
#pragma unroll
                for (int u = 0; u < 8; ++u) m[u] = column[static_cast<size_t>(i + u) * d];
#pragma unroll
                for (int u = 0; u < 8; ++u) x = dev::fmadd(m[u], acc[i + u], x);
            }
            for (; i < d; ++i) x = dev::fmadd(column[static_cast<size_t>(i) * d], acc[i], x);
        }
        out[j] = x;
    }
}

constexpr int kMergeWarps = 8;  // warps of a merge CTA (codec_merge_kernel)

/// What a row's entries of the outlier side store add to its softmax (its sequence's store).
struct SideSum {
    float top;  ///< the max of the splits' max and the entries' scores (log2 units)
    float l;    ///< sum of exp2(s_e - top) over the entries the row sees
};

/// Entries of the outlier side store one merge CTA scores at once (a thread each).
constexpr int kSideBlock = kMergeWarps * 32;

/// The shared memory of merge_outliers.
template <int D>
struct SideShared {
    float q[D];                   ///< the row's query
    float scores[kSideBlock];     ///< a block's scores (log2 units; -inf: not seen)
    float parts[kMergeWarps][D];  ///< each warp's value sum
    float stats[kMergeWarps];     ///< each warp's max, then its weight sum
    float sum[D];                 ///< sum_e exp2(s_e - top) v_e
};

/// The entries of unit u's head that `row` sees (TokenWindow::visible), scored exactly from their
/// records as the CPU's run_outliers does (s_e = scale <q, k_e>, log2 units), in blocks of
/// kSideBlock: a thread scores an entry, then warp w sums the values of the block's entries
/// 32 w.. (lanes over coordinates) under the running max (rescaled as it grows); sh.sum gets
/// sum_e exp2(s_e - top) v_e. Every thread of the CTA calls it.
template <class Codec, int D>
__device__ SideSum merge_outliers(const AttentionParams<Codec>& a, int u, int row, float mx,
                                  SideShared<D>& sh) {
    constexpr int E = D / 32;
    const OutlierView& v = a.side_of(u);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, d = a.store.d, h = a.head(u);
    const int count = v.records != nullptr ? v.counts[h] : 0, lim = a.limit(u, row),
              vb = v.vector_bytes;
    const int32_t* pos = v.positions + static_cast<size_t>(h) * v.capacity;
    const uint8_t* records = v.records + static_cast<size_t>(h) * v.capacity * 2 * vb;
    const float* q = a.query(u, row);
    for (int j = threadIdx.x; j < D; j += blockDim.x) sh.q[j] = j < d ? q[j] : 0.0f;
    __syncthreads();
    float top = mx, lw = 0.0f, acc[E] = {};
    for (int base = 0; base < count; base += kSideBlock) {
        const int i = base + threadIdx.x;
        float s = -INFINITY;
        if (i < count && a.window.visible(pos[i], lim))
            s = outlier_dot(records + static_cast<size_t>(i) * 2 * vb, v.bits, d, sh.q) *
                a.scale_log2;
        sh.scores[threadIdx.x] = s;
        s = warp_max(s);
        if (lane == 0) sh.stats[warp] = s;
        __syncthreads();
        float next = top;
        for (int w = 0; w < kMergeWarps; ++w) next = fmaxf(next, sh.stats[w]);
        if (next != -INFINITY) {
            const float c = exp2f(top - next);  // 0 while top is -inf (nothing summed yet)
            lw *= c;
#pragma unroll
            for (int e = 0; e < E; ++e) acc[e] *= c;
            top = next;
            // Four entries' loads in flight at a time (an entry past the count or not seen has
            // weight 0 and reads the block's first, which exists).
            for (int k0 = warp * 32; k0 < warp * 32 + 32 && base + k0 < count; k0 += 4) {
                float w[4], ws[4], x[4][E];
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const int i = base + k0 + k;
                    const float sc = i < count ? sh.scores[k0 + k] : -INFINITY;
                    w[k] = sc == -INFINITY ? 0.0f : exp2f(sc - top);
                    const uint8_t* value =
                        records + static_cast<size_t>(w[k] > 0.0f ? i : base) * 2 * vb + vb;
                    ws[k] = w[k] * outlier_scale(value, v.bits, d);
#pragma unroll
                    for (int e = 0; e < E; ++e)
                        x[k][e] =
                            lane + 32 * e < d ? outlier_code(value, v.bits, lane + 32 * e) : 0.0f;
                }
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    lw += w[k];
#pragma unroll
                    for (int e = 0; e < E; ++e) acc[e] = dev::fmadd(ws[k], x[k][e], acc[e]);
                }
            }
        }
        __syncthreads();  // the scores and stats are written again
    }
#pragma unroll
    for (int e = 0; e < E; ++e) sh.parts[warp][lane + 32 * e] = acc[e];
    if (lane == 0) sh.stats[warp] = lw;
    __syncthreads();
    SideSum r{top, 0.0f};
    for (int w = 0; w < kMergeWarps; ++w) r.l += sh.stats[w];
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float x = 0.0f;
#pragma unroll
        for (int w = 0; w < kMergeWarps; ++w) x += sh.parts[w][j];
        sh.sum[j] = x;
    }
    return r;  // (sh.sum is the CTA's once it synchronizes)
}

// One CTA of kMergeWarps warps per (head, row): every warp finds the splits' max and
// denominator (lanes over splits); warp w sums splits w, w + W, ... (lanes over coordinates,
// four splits' loads issued before their sums, the first four's before the max is found; a
// split past the end, or without tokens, has weight 0), the warps' sums are added in warp
// order, and the CTA maps the sum back from the value codec's domain. (One warp per row, four
// splits at a time, took 22.5 us under ncu at 64 splits, one sequence of 8K tokens.)

template <class Codec, int D>
__global__ void __launch_bounds__(kMergeWarps * 32)
    codec_merge_kernel(const AttentionParams<Codec> a) {
    constexpr int E = D / 32;
    __shared__ float part[kMergeWarps][D];
    __shared__ float acc_s[D];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int item = blockIdx.x, u = item / a.rows, row = item % a.rows;
    const size_t base = static_cast<size_t>(item) * a.splits;
    wait_for_prerequisite_grid();  // the attention's partials (a programmatic dependent on sm_90)
    // Four splits' (max, sum) and partial sums: warp w's splits s0, s0 + W, s0 + 2 W, s0 + 3 W
    // (a split past the end has weight 0 and reads s0's, which exists).
    float m[4], o[4][E];
    const auto load = [&](int s0) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int s = s0 + k * kMergeWarps;
            const size_t at = base + (s < a.splits ? s : s0);
            m[k] = s < a.splits ? a.partial_ml[at].x : -INFINITY;
#pragma unroll
            for (int e = 0; e < E; ++e) o[k][e] = a.partial_o[at * D + lane + 32 * e];
        }
    };
    if (warp < a.splits) load(warp);  // read while the max and denominator are found
    float mx = -INFINITY;
    for (int s = lane; s < a.splits; s += 32) mx = fmaxf(mx, a.partial_ml[base + s].x);
    mx = warp_max(mx);
    float acc[E] = {};
    float l = 0.0f;
    if (mx != -INFINITY) {
        for (int s = lane; s < a.splits; s += 32) {
            const float2 ml = a.partial_ml[base + s];
            l += exp2f(ml.x - mx) * ml.y;
        }
        l = warp_sum(l);
        for (int s0 = warp; s0 < a.splits; s0 += 4 * kMergeWarps) {
            if (s0 != warp) load(s0);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float f = exp2f(m[k] - mx);
#pragma unroll
                for (int e = 0; e < E; ++e) acc[e] = dev::fmadd(f, o[k][e], acc[e]);
            }
        }
    }
#pragma unroll
    for (int e = 0; e < E; ++e) part[warp][lane + 32 * e] = acc[e];
    // The outlier side store's tokens join the softmax: their sum (in the keys' own space) is
    // added after the value codec's map back, which is linear.
    __shared__ SideShared<D> side_shared;
    float split_weight = 1.0f, side_weight = 0.0f;
    if (a.outliers.active()) {
        const SideSum side = merge_outliers<Codec, D>(a, u, row, mx, side_shared);
        const float splits_l = mx == -INFINITY ? 0.0f : exp2f(mx - side.top) * l;
        const float inv_all = splits_l + side.l > 0.0f ? 1.0f / (splits_l + side.l) : 0.0f;
        split_weight = mx == -INFINITY ? 0.0f : exp2f(mx - side.top) * l * inv_all;
        side_weight = inv_all;
    }
    __syncthreads();
    const float inv = l > 0.0f ? split_weight / l : 0.0f;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float x = part[0][j];
#pragma unroll
        for (int w = 1; w < kMergeWarps; ++w) x += part[w][j];
        acc_s[j] = x * inv;
    }
    __syncthreads();
    float* out = a.output(u, row);
    value_finalize<D>(a.value_params(u), acc_s, out);
    if (a.outliers.active()) {
        __syncthreads();  // value_finalize's stores are seen by the CTA
        for (int j = threadIdx.x; j < a.store.d; j += blockDim.x)
            out[j] = dev::fmadd(side_weight, side_shared.sum[j], out[j]);
    }
}

}  // namespace veloxquant::cuda::codec
