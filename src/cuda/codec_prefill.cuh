// The generic device path's attention for many query rows at once (a prefill chunk), header-only:
//   codec_prefill_kernel   128 query rows of one KV head (16 a warp) over one split of its tokens,
//                          a page (64 tokens) at a time: each warp stages its 8 tokens' codes
//                          by cp.async (the next page's during this page's math) and decodes
//                          them into the CTA's fp16 tiles of key features and value centroids,
//                          and every warp multiplies the tiles with its rows on tensor cores
//                          (mma m16n8k16) in the
//                          FlashAttention-2 order (Dao, arXiv 2307.08691, Alg. 1): S = Q' F^T, the
//                          online softmax in registers, O += P V. Its partial states are
//                          codec_attention_kernel's, and codec_merge_kernel merges them.
//                          A sliding window's CTA walks the span from its first row's window
//                          on (TokenWindow: sink pages, then the window's pages), and tokens
//                          the outlier side store holds are -inf here (the merge scores them
//                          from their records).
// codec_attention_kernel serves at most 8 rows a CTA and decodes every token's codes once per
// CTA; a 512-query chunk of 4 query heads per KV head has 2048 rows, so each code was decoded
// 256 times. Here it is decoded 16 times, and the scores and value sums are the tensor cores'.
//
// Scores use the codecs' feature form (device_common.h): score_r(t) = state_r[extra_t] +
// factor_t sum_i f_i(code_t) state_r[offset + i]. A = the rows' states, each row scaled by a power
// of 2 so that its largest entry is below 1 and split into fp16 high and low parts (two mma, ~22
// bits of every entry: codec_feature_scores.cuh); B = the page's features [64 tokens][F] (fp16;
// features not exact in fp16, such as turboquant's centroid sums, as a high and a low half, whose
// third mma keeps logits of tens as close to the CPU's as the lane scores: FeatureScore::
// kExactHalves).
// Values: the tile holds the value codec's centroids, the token's scale goes into P relative to the
// page's largest |scale| (codec_value_mma.cuh's scheme, with one running factor a warp).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "cuda/codec_attention.cuh"
#include "cuda/codec_feature_scores.cuh"
#include "cuda/codec_kernels.cuh"
#include "cuda/codec_value_mma.cuh"
#include "cuda/ptx_wrappers.cuh"
#include "cuda/warp_reduce.cuh"

namespace veloxquant::cuda::codec {

constexpr int kPrefillWarps = 8;
constexpr int kPrefillRows = 16 * kPrefillWarps;  // query rows of a CTA: a warp's are the mma's m
constexpr int kPrefillTokens = kPage;             // tokens of a tile: one page
constexpr int kWarpTokens = kPrefillTokens / kPrefillWarps;  // tokens of a page a warp decodes
static_assert(kPrefillTokens == 64 && kWarpTokens * kPrefillWarps == kPrefillTokens &&
                  kWarpTokens % 8 == 0 && 32 % kWarpTokens == 0,
              "the score loops hold 8 n-tiles; a warp's slice starts 8-byte aligned and lies in "
              "one word of the outlier mask");
// A token's entry in the page's `extra` facts where the outlier side store holds it (its logit is
// -inf here); Codec::extra_entry gives -1 (none) or a state index.
constexpr int kSideEntry = -2;

/// Shared memory of codec_prefill_kernel (byte offsets), computed alike by the launcher and the
/// kernel: the codecs' tables | states [2][128][FS] halves | features [64][FS] halves, and their
/// low halves [64][FS] where they are split (FeatureScore::kExactHalves false) | values
/// [64][D + 8] halves | per row: scale, centre bias | per token: key factor, value scale, extra
/// entry | each warp's staging slice: the raw key codes, value codes, key and value scalars of its
/// 8 tokens of a page, at the launch's staged strides. FS = feature_stride(feature span): rows
/// an odd multiple of 16 bytes apart, as ldmatrix reads them without bank conflicts.
struct PrefillLayout {
    size_t states = 0, features = 0, features_low = 0, values = 0, row_scale = 0, bias = 0,
           factor = 0, value_scale = 0, extra = 0, stage = 0, total = 0;
    size_t warp_stage = 0, stage_values = 0, stage_key_scalars = 0, stage_value_scalars = 0;
};

__host__ __device__ constexpr PrefillLayout prefill_layout(int D, const StageSizes& z,
                                                           bool split_features) {
    const size_t fs = static_cast<size_t>(feature_stride(z.feature_span)) * sizeof(__half);
    PrefillLayout L;
    L.states = round16(static_cast<size_t>(z.table_floats) * sizeof(float));
    L.features = L.states + 2 * kPrefillRows * fs;
    L.features_low = L.features + kPrefillTokens * fs;
    L.values = L.features_low + (split_features ? kPrefillTokens * fs : 0);
    L.row_scale = L.values + kPrefillTokens * static_cast<size_t>(tile_stride(D)) * sizeof(__half);
    L.bias = L.row_scale + kPrefillRows * sizeof(float);
    L.factor = L.bias + kPrefillRows * sizeof(float);
    L.value_scale = L.factor + kPrefillTokens * sizeof(float);
    L.extra = L.value_scale + kPrefillTokens * sizeof(float);
    L.stage = L.extra + kPrefillTokens * sizeof(int);
    L.stage_values = round16(static_cast<size_t>(kWarpTokens) * z.key_stride);
    L.stage_key_scalars =
        L.stage_values + round16(static_cast<size_t>(kWarpTokens) * z.value_stride);
    L.stage_value_scalars = L.stage_key_scalars + kWarpTokens * sizeof(float) * z.key_scalars;
    L.warp_stage = round16(L.stage_value_scalars + kWarpTokens * sizeof(float) * z.value_scalars);
    L.total = L.stage + kPrefillWarps * L.warp_stage;
    return L;
}

/// Whether every region of L starts at a 16-byte boundary (ldmatrix rows, cp.async's 16-byte
/// copies, the tables' float4 reads).
__host__ __device__ constexpr bool prefill_layout_aligned(const PrefillLayout& L) {
    return (L.states | L.features | L.features_low | L.values | L.row_scale | L.bias | L.factor |
            L.value_scale | L.extra | L.stage | L.warp_stage | L.stage_values |
            L.stage_key_scalars | L.stage_value_scalars) %
               16 ==
           0;
}
// Odd strides and counts: a table of 37 floats, 3-bit keys of d = 96 (36 + 1 word staged), 2
// key and 3 value scalars, a feature span of 100.
static_assert(prefill_layout_aligned(prefill_layout(128, StageSizes{100, 37, 44, 48, 2, 3, 1, 100},
                                                    true)));
static_assert(prefill_layout_aligned(prefill_layout(64, StageSizes{68, 1028, 20, 16, 1, 1, 1, 64},
                                                    false)));

/// The fp16 states of rows row0 .. row0 + 15 (of `rows` real ones), by one warp: row r's entries
/// offset .. offset + F - 1 times 2^-e_r (e_r the exponent of its largest |entry|) as high and low
/// halves [16][fs], zeros past F and for rows past `rows`; row_scale[r] = 2^e_r.
__device__ inline void prefill_row_states(const float* states, int stride, int rows, int offset,
                                          int F, int fs, __half* hi, __half* lo, float* row_scale,
                                          int lane) {
    for (int r = 0; r < 16; ++r) {
        const float* s = states + static_cast<size_t>(r) * stride + offset;
        float top = 0.0f;
        if (r < rows)
            for (int i = lane; i < F; i += 32) top = fmaxf(top, fabsf(s[i]));
        top = warp_max(top);
        int e = 0;
        frexpf(top, &e);  // top = m 2^e, m in [0.5, 1) (e = 0 for top = 0)
        if (lane == 0) row_scale[r] = ldexpf(1.0f, e);
        for (int k = lane; k < fs; k += 32) {
            const float x = r < rows && k < F ? ldexpf(s[k], -e) : 0.0f;
            const __half h = __float2half_rn(x);
            hi[r * fs + k] = h;
            lo[r * fs + k] = __float2half_rn(x - __half2float(h));
        }
    }
}

/// The stride of a warp's staged rows of row_bytes bytes (stage_warp_rows): the launch's padded
/// stride where rows are a multiple of 4 bytes, else row_bytes (the rows as they lie in the page:
/// stage_rows would read them word by word and wait on each load).
__device__ __forceinline__ int warp_stage_stride(int row_bytes, int padded_stride) {
    return row_bytes % 4 == 0 ? padded_stride : row_bytes;
}

/// A warp's n <= kWarpTokens rows of row_bytes bytes of a page region, from src (8-byte aligned:
/// its first slot is a multiple of 8), to its staging slice at `stride` (warp_stage_stride) by
/// asynchronous copies; the caller waits (stage_wait). Rows as they lie go 8 bytes a copy: a
/// region ends on a 64-byte boundary, so the last copy stays inside it, and the slice holds
/// kWarpTokens rows at the padded stride >= row_bytes.
__device__ __forceinline__ void stage_warp_rows(uint8_t* dst, int stride, const uint8_t* src,
                                                int row_bytes, int n, int lane) {
    if (stride != row_bytes) return stage_rows(dst, stride, src, row_bytes, n, lane);
    for (int i = lane; i < (n * row_bytes + 7) / 8; i += 32)
        __pipeline_memcpy_async(dst + 8 * i, src + 8 * i, 8);
}

/// Zeroes rows `from` .. kWarpTokens - 1 of a warp's tile rows of `width` halves (`stride`
/// apart): a page's slots past the tokens attended hold stale codes, whose decoded values could
/// be NaN or Inf and would reach every row's sum through a zero weight.
__device__ __forceinline__ void zero_tile_rows(__half* tile, int stride, int width, int from,
                                               int lane) {
    for (int i = lane; i < (kWarpTokens - from) * width; i += 32) {
        const int t = from + i / width;
        tile[t * stride + i % width] = __half{};
    }
}

// grid (splits, units, row blocks of 128). Each warp keeps its 16 rows' running max and sum (two
// rows a thread: g and g + 8 of the mma fragments, g = lane / 4) and O [16][D] in C fragments.
template <class Codec, int D, bool CENTRED = false>
__global__ void __launch_bounds__(kPrefillWarps * 32, 1)
    codec_prefill_kernel(const AttentionParams<Codec> a) {
    using Features = FeatureScore<Codec>;
    static_assert(Features::kAvailable, "the wide prefill scores on the codec's feature form");
    static_assert(D == 64 || D == 128, "O [16][D] lives in registers");
    constexpr int kDimTiles = D / 8;  // n-tiles of O
    constexpr int kTokenTiles = 8;    // n-tiles of S (64 tokens)
    constexpr int VS = tile_stride(D);
    extern __shared__ float4 smem_vec[];
    uint8_t* smem = reinterpret_cast<uint8_t*>(smem_vec);
    const int span = a.stage_sizes().feature_span;
    const int fs = feature_stride(span);
    constexpr bool kSplit = !Features::kExactHalves;  // the features' high and low halves
    const PrefillLayout L = prefill_layout(D, a.stage_sizes(), kSplit);
    const int split = blockIdx.x, u = blockIdx.y, h = a.head(u);
    const int row0 = blockIdx.z * kPrefillRows;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, quad = lane & 3;
    const int S = a.state_stride, d = a.store.d;

    typename Codec::Params kp = a.key_params(u);
    const dev::ValueDevice::Params& vp = a.value_params(u);
    float* key_table = reinterpret_cast<float*>(smem);
    stage_table<Codec>(kp, key_table);
    __half* value_table = reinterpret_cast<__half*>(key_table + (a.key_table_floats + 3) / 4 * 4);
    fill_value_table(vp, value_table);
    const bool scaled = vp.bits != 16;

    __half* st_hi = reinterpret_cast<__half*>(smem + L.states);
    __half* st_lo = st_hi + kPrefillRows * fs;
    __half* features = reinterpret_cast<__half*>(smem + L.features);
    __half* features_low = reinterpret_cast<__half*>(smem + L.features_low);
    __half* values = reinterpret_cast<__half*>(smem + L.values);
    float* row_scale = reinterpret_cast<float*>(smem + L.row_scale);
    float* bias = reinterpret_cast<float*>(smem + L.bias);
    float* factor = reinterpret_cast<float*>(smem + L.factor);
    float* value_scale = reinterpret_cast<float*>(smem + L.value_scale);
    int* extra = reinterpret_cast<int*>(smem + L.extra);
    uint8_t* st_key = smem + L.stage + warp * L.warp_stage;  // this warp's staging slice
    uint8_t* st_value = st_key + L.stage_values;
    float* st_kscal = reinterpret_cast<float*>(st_key + L.stage_key_scalars);
    float* st_vscal = reinterpret_cast<float*>(st_key + L.stage_value_scalars);

    // This warp's rows: wrow0 .. wrow0 + wrows - 1 of the unit; the thread's two, ra and ra + 8.
    const int wrow0 = row0 + 16 * warp;
    const int wrows = max(0, min(16, a.rows - wrow0));
    const int ra = wrow0 + g, rb = ra + 8;
    const float* states = a.states + static_cast<size_t>(u) * a.rows * S;
    wait_for_prerequisite_grid();  // the states (this grid is the prepare kernel's dependent)
    prefill_row_states(states + static_cast<size_t>(wrow0) * S, S, wrows, Codec::feature_offset(kp),
                       Codec::feature_count(kp), fs, st_hi + 16 * warp * fs, st_lo + 16 * warp * fs,
                       row_scale + 16 * warp, lane);
    __syncthreads();  // tables and states in place

    const int F = Features::padded(kp);
    // Each row's factor from mma scores to logits in log2 units: its state's power of 2 times the
    // softmax scale (times log2 e).
    const float logit_a = ra < a.rows ? row_scale[16 * warp + g] * a.scale_log2 : 0.0f;
    const float logit_b = rb < a.rows ? row_scale[16 * warp + g + 8] * a.scale_log2 : 0.0f;
    const int lim_a = ra < a.rows ? a.limit(u, ra) : 0;
    const int lim_b = rb < a.rows ? a.limit(u, rb) : 0;
    // Rows are ordered by query, so the last real row sees the most tokens.
    const int lim_warp = wrows > 0 ? a.limit(u, wrow0 + wrows - 1) : 0;
    const int lim_first = wrows == 16 ? a.limit(u, wrow0) : 0;  // the fewest tokens a row sees
    const int lim_cta = a.limit(u, min(row0 + kPrefillRows, a.rows) - 1);
    // The splits walk this CTA's span (TokenWindow): span token v is position
    // window.position(v, gap), the gap from its first row's window (none without a window).
    const int gap = a.span_gap(u, row0);
    const int t_begin = split * a.tokens_per_split;
    const int t_end = min(t_begin + a.tokens_per_split, lim_cta - gap);
    // A sliding window: the warp skips a page before every one of its rows' windows (not a sink
    // page), and takes the logits without mask only from the last row's window start on.
    const int window = a.window.window, sinks = a.window.sinks;
    const int below_warp = window > 0 && wrows > 0 ? a.limit(u, wrow0) - window : 0;
    const int plain_from = window > 0 ? lim_warp - window : 0;
    // Tokens of the outlier side store are skipped in the pages (codec_merge_kernel scores them
    // from their records): this unit's mask row, null where it has none.
    const uint32_t* side = a.outliers.active() ? a.outliers.mask_row(u, h) : nullptr;
    const HeadRegions R = a.store.regions[h];
    const TileWalk feature_walk(F / Features::kGroup, lane, kWarpTokens);
    const TileWalk value_walk =
        value_tile_walk(static_cast<int>(R.value_code_bytes), lane, kWarpTokens);

    const int key_stride =
        warp_stage_stride(static_cast<int>(R.key_code_bytes), a.stage_key_stride);
    const int value_stride =
        warp_stage_stride(static_cast<int>(R.value_code_bytes), a.stage_value_stride);
    // This warp's kWarpTokens tokens of the page at span token v0: asynchronous copies of their
    // codes and scalars to its staging slice (the caller waits: stage_wait).
    const int slot = kWarpTokens * warp;  // the warp's first token of a page
    const auto stage_page = [&](int v0) {
        const int mine = min(kWarpTokens, max(0, min(kPrefillTokens, t_end - v0) - slot));
        if (mine == 0) return;
        const uint8_t* page = a.page(u, a.window.position(v0, gap));
        stage_warp_rows(st_key, key_stride, page + R.key_codes + slot * R.key_code_bytes,
                        static_cast<int>(R.key_code_bytes), mine, lane);
        stage_warp_rows(st_value, value_stride, page + R.value_codes + slot * R.value_code_bytes,
                        static_cast<int>(R.value_code_bytes), mine, lane);
        const float* ks = reinterpret_cast<const float*>(page + R.key_scalars) + slot;
        const float* vs = reinterpret_cast<const float*>(page + R.value_scalars) + slot;
        for (int i = lane; i < kWarpTokens * (a.stage_key_scalars + a.stage_value_scalars);
             i += 32) {
            // scalar k (key scalars, then value scalars) of token t
            const int k = i / kWarpTokens, t = i % kWarpTokens;
            if (t >= mine) continue;
            if (k < a.stage_key_scalars)
                __pipeline_memcpy_async(st_kscal + kWarpTokens * k + t, ks + k * kPage + t,
                                        sizeof(float));
            else
                __pipeline_memcpy_async(st_vscal + kWarpTokens * (k - a.stage_key_scalars) + t,
                                        vs + (k - a.stage_key_scalars) * kPage + t, sizeof(float));
        }
    };

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    float o[kDimTiles][4];
#pragma unroll
    for (int j = 0; j < kDimTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float o_factor = 1.0f;  // the true sums are o * o_factor

    if (t_begin < t_end) stage_page(t_begin);
    for (int v0 = t_begin; v0 < t_end; v0 += kPrefillTokens) {
        const int n = min(kPrefillTokens, t_end - v0);  // v0 is a page's first slot
        const int t0 = a.window.position(v0, gap);      // and t0 its position
        stage_wait();                                   // this warp's slice of the page has landed
        __syncthreads();  // and every warp is done with the previous page's tiles
        // Warp w decodes its tokens from its slice: features, value centroids, and per token the
        // key factor, the value scale and the extra state entry.
        const int mine = min(kWarpTokens, max(0, n - slot));
        __half* ftile = features + slot * fs;
        __half* flow = kSplit ? features_low + slot * fs : nullptr;
        __half* vtile = values + slot * VS;
        if (mine > 0) {
            Features::decode_tile(kp, st_key, key_stride, t0 + slot, ftile, fs, feature_walk, flow);
            decode_value_tile<D>(
                TileCodes{st_value, value_stride, static_cast<int>(R.value_code_bytes), vp.bits, d},
                value_table, vtile, value_walk, lane);
        }
        bool has_extra = false;
        if (lane < kWarpTokens) {
            const bool real = lane < mine;
            int e = real ? Codec::extra_entry(kp, st_key + lane * key_stride) : -1;
            if (real && side != nullptr) {  // (a warp's tokens lie in one mask word)
                const int t = t0 + slot + lane;
                if ((side[t / 32] >> (t % 32)) & 1u) e = kSideEntry;
            }
            factor[slot + lane] = real ? Codec::feature_factor(st_kscal + lane) : 0.0f;
            extra[slot + lane] = e;
            value_scale[slot + lane] = real ? (scaled ? st_vscal[lane] : 1.0f) : 0.0f;
            has_extra = e != -1;
        }
        __syncwarp();
        zero_tile_rows(ftile, fs, F, mine, lane);
        if constexpr (kSplit) zero_tile_rows(flow, fs, F, mine, lane);
        zero_tile_rows(vtile, VS, D, mine, lane);
        // The slice is decoded: the next page's copies run during this one's math.
        if (v0 + kPrefillTokens < t_end) stage_page(v0 + kPrefillTokens);
        // Centred keys: each row's <q, c_page> (add_page_center's sum), two threads a row.
        if constexpr (CENTRED) {
            const int r = threadIdx.x >> 1, P = a.center.pairs;
            const float* w = states + static_cast<size_t>(row0 + r) * S + a.center.offset;
            const float2* z = a.center.phases + static_cast<size_t>(t0 / kPage) * P;
            const bool real = row0 + r < a.rows;
            float b = 0.0f;
            if (real)
#pragma unroll 4
                for (int i = threadIdx.x & 1; i < P; i += 2) b += w[i] * z[i].x - w[P + i] * z[i].y;
            b += __shfl_xor_sync(kFull, b, 1);
            if (real && (threadIdx.x & 1) == 0) b += w[2 * P];
            if ((threadIdx.x & 1) == 0) bias[r] = b;
        }
        // The page's tiles, token facts and biases are in place. A page without extra entries
        // or skipped tokens that all 16 of this warp's rows see in full takes the logits without
        // mask or entry.
        const bool any_extra = __syncthreads_or(has_extra);
        // (warp-uniform) none of this warp's rows sees the page
        if (t0 >= lim_warp || (t0 + kPrefillTokens <= below_warp && t0 >= sinks)) continue;
        const bool plain = !any_extra && t0 + kPrefillTokens <= lim_first &&
                           (window == 0 || t0 >= plain_from || t0 + kPrefillTokens <= sinks);

        // S [16 rows][64 tokens] = states x features^T: states hi and lo x features hi, and where
        // the features are split, states hi x features lo (lo x lo is below fp32's last bits).
        float s[kTokenTiles][4];
#pragma unroll
        for (int j = 0; j < kTokenTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
        // ldmatrix rows: A (rows +0-7 | +8-15) x (k +0 | +8); B (tokens of tile j | j + 1) x (k
        // +0 | +8). Lane i gives row i % 8 of matrix i / 8.
        const int a_off = (16 * warp + (lane & 7) + ((lane >> 3) & 1) * 8) * fs + (lane >> 4) * 8;
        const int b_off = ((lane & 7) + (lane >> 4) * 8) * fs + ((lane >> 3) & 1) * 8;
        for (int k0 = 0; k0 < F; k0 += 16) {
            uint32_t ah[4], al[4];
            ldmatrix_x4<false>(ah, st_hi + a_off + k0);
            ldmatrix_x4<false>(al, st_lo + a_off + k0);
#pragma unroll
            for (int j = 0; j < kTokenTiles; j += 2) {
                uint32_t b[4];
                ldmatrix_x4<false>(b, features + b_off + 8 * j * fs + k0);
                mma_16816(s[j], ah, b[0], b[1]);
                mma_16816(s[j], al, b[0], b[1]);
                mma_16816(s[j + 1], ah, b[2], b[3]);
                mma_16816(s[j + 1], al, b[2], b[3]);
                if constexpr (kSplit) {
                    ldmatrix_x4<false>(b, features_low + b_off + 8 * j * fs + k0);
                    mma_16816(s[j], ah, b[0], b[1]);
                    mma_16816(s[j + 1], ah, b[2], b[3]);
                }
            }
        }
        // Logits (log2 units): scale back, the token's factor and extra entry, the centre bias;
        // tokens a row does not see are -inf. Element i of tile j: row g (i < 2) or g + 8, token
        // 8 j + 2 quad + i % 2.
        float bias_a = 0.0f, bias_b = 0.0f;
        if constexpr (CENTRED)
            bias_a = bias[16 * warp + g] * a.scale_log2,
            bias_b = bias[16 * warp + g + 8] * a.scale_log2;
        float mx[2] = {-INFINITY, -INFINITY};
        if (plain) {
#pragma unroll
            for (int j = 0; j < kTokenTiles; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int t = 8 * j + 2 * quad + (i & 1), second = i >> 1;
                    const float x = s[j][i] * (second ? logit_b : logit_a) * factor[t] +
                                    (second ? bias_b : bias_a);
                    s[j][i] = x;
                    mx[second] = fmaxf(mx[second], x);
                }
        } else {
            const float* state_a = states + static_cast<size_t>(ra) * S;
            const float* state_b = states + static_cast<size_t>(rb) * S;
#pragma unroll
            for (int j = 0; j < kTokenTiles; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int t = 8 * j + 2 * quad + (i & 1), second = i >> 1;
                    const int e = extra[t], lim = second ? lim_b : lim_a;
                    float x = s[j][i] * (second ? logit_b : logit_a) * factor[t] +
                              (second ? bias_b : bias_a);
                    if (e >= 0 && lim > 0)  // (a real row)
                        x += (second ? state_b : state_a)[e] * a.scale_log2;
                    x = e != kSideEntry && a.window.visible(t0 + t, lim) ? x : -INFINITY;
                    s[j][i] = x;
                    mx[second] = fmaxf(mx[second], x);
                }
        }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 2));
            const float m_new = fmaxf(m[r], mx[r]);
            // A row without a token yet keeps m = -inf: weights 0, sums unchanged.
            corr[r] = m_new == -INFINITY ? 1.0f : exp2_approx(m[r] - m_new);
            m[r] = m_new;
        }
        float sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < kTokenTiles; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = i >> 1;
                const float p = m[r] == -INFINITY ? 0.0f : exp2_approx(s[j][i] - m[r]);
                s[j][i] = p;
                sum[r] += p;
            }
        l[0] = l[0] * corr[0] + sum[0];
        l[1] = l[1] * corr[1] + sum[1];
        // The page's value scales: weights p s_t / top, top the page's largest |s_t| (kept
        // within 2^64 of the running factor times the rows' corrections: ValueSum::chunk_factor).
        float top = 1.0f;
        if (scaled) {
            const float vmax =
                warp_max(fmaxf(fabsf(value_scale[lane]), fabsf(value_scale[lane + 32])));
            const float corr_max = warp_max(fmaxf(corr[0], corr[1]));
            top = vmax == 0.0f ? o_factor : fmaxf(vmax, corr_max * o_factor * 0x1p-64f);
        }
        const float ka = corr[0] * (o_factor / top), kb = corr[1] * (o_factor / top);
        o_factor = top;
#pragma unroll
        for (int j = 0; j < kDimTiles; ++j)
            o[j][0] *= ka, o[j][1] *= ka, o[j][2] *= kb, o[j][3] *= kb;
        const float inv_top = 1.0f / top;
        // O += P V, 16 tokens a k step: A = P from the score fragments (tiles 2 kk, 2 kk + 1),
        // B = the value tile through ldmatrix.trans (tokens +0-7 | +8-15) x (dims of tile j |
        // j + 1).
        const int v_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * VS + (lane >> 4) * 8;
#pragma unroll
        for (int kk = 0; kk < kTokenTiles / 2; ++kk) {
            float w[2][4];
#pragma unroll
            for (int jj = 0; jj < 2; ++jj)
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    w[jj][i] =
                        s[2 * kk + jj][i] *
                        (scaled ? value_scale[16 * kk + 8 * jj + 2 * quad + (i & 1)] * inv_top
                                : 1.0f);
            uint32_t p[4];
            p[0] = pack_half2(__float2half_rn(w[0][0]), __float2half_rn(w[0][1]));
            p[1] = pack_half2(__float2half_rn(w[0][2]), __float2half_rn(w[0][3]));
            p[2] = pack_half2(__float2half_rn(w[1][0]), __float2half_rn(w[1][1]));
            p[3] = pack_half2(__float2half_rn(w[1][2]), __float2half_rn(w[1][3]));
#pragma unroll
            for (int j = 0; j < kDimTiles; j += 2) {
                uint32_t b[4];
                ldmatrix_x4<true>(b, values + v_off + 16 * kk * VS + 8 * j);
                mma_16816(o[j], p, b[0], b[1]);
                mma_16816(o[j + 1], p, b[2], b[3]);
            }
        }
    }

    // The split's partial state of each real row: (max, sum) and O times its factor.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(kFull, l[r], 1);
        l[r] += __shfl_xor_sync(kFull, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = r == 0 ? ra : rb;
        if (row >= a.rows) continue;
        const size_t at = (static_cast<size_t>(u) * a.rows + row) * a.splits + split;
        if (quad == 0) a.partial_ml[at] = make_float2(m[r], l[r]);
        float* dst = a.partial_o + at * D + 2 * quad;
#pragma unroll
        for (int j = 0; j < kDimTiles; ++j)
            *reinterpret_cast<float2*>(dst + 8 * j) =
                make_float2(o[j][2 * r] * o_factor, o[j][2 * r + 1] * o_factor);
    }
}

}  // namespace veloxquant::cuda::codec
