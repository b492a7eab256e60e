// Header-only CUDA kernels of the generic device path: every method's device codec
// (src/device_codecs/, one thread per token) on the CPU's page layout (src/cache/paged_store.h).
// The launches' parameters and the per-item kernels; the attention itself is codec_attention.cuh.
//   codec_encode_kernel      one thread per (head, token): key codec + value codec
//   codec_encode_staged_kernel  the same with rows and codes staged in shared memory
//   codec_dequantize_kernel  one thread per (head, token)
//   codec_prepare_kernel     one thread per (head, query row): the key codec's query state
//   codec_affine_prepare_kernel  the same state as c + M q, CTAs over (row, 32 entries)
// Rows: row r of KV head h is query i = r / group of query head h * group + r % group; with
// causal masking it sees tokens [0, size - n_queries + i], else every token. A decode step is
// n_queries = 1; a prefill chunk's queries are its own (already encoded) tokens.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/codec_attention_layout.cuh"
#include "cuda/codec_params_view.h"
#include "cuda/warp_reduce.cuh"
#include "device_codecs/device_common.h"
#include "device_codecs/value_device.h"

namespace veloxquant::cuda::codec {

constexpr int kPage = 64;      // tokens per page (kTokensPerPage)
constexpr int kWarps = 4;      // warps per attention CTA
constexpr int kThreads = 128;  // threads per CTA of the per-item kernels
static_assert(TokenWindow::kPageTokens == kPage, "a sliding window evicts whole pages");

/// One KV head's regions inside a page (offsets from the page start; PageLayout's HeadLayout).
struct HeadRegions {
    uint32_t key_codes = 0, key_scalars = 0, value_codes = 0, value_scalars = 0;
    uint32_t key_code_bytes = 0, value_code_bytes = 0;
};

/// Storage and codecs of one cache, as the kernels see them (device pointers).
template <class Codec>
struct Store {
    const typename Codec::Params* keys = nullptr;      ///< [heads]
    const dev::ValueDevice::Params* values = nullptr;  ///< [heads]
    const HeadRegions* regions = nullptr;              ///< [heads]
    uint8_t* pool = nullptr;
    const int32_t* page_table = nullptr;
    uint64_t page_bytes = 0;
    int heads = 0;
    int d = 0;
    /// A batch of kin caches: sequence s's codecs are kin[s]'s (codec_params_view.h); null
    /// where every sequence has keys and values above.
    const CodecParamsView* kin = nullptr;

    __device__ uint8_t* page(int pos) const {
        return pool + static_cast<uint64_t>(page_table[pos / kPage]) * page_bytes;
    }
    __device__ const typename Codec::Params& key_params(int sequence, int h) const {
        return kin != nullptr ? static_cast<const typename Codec::Params*>(kin[sequence].keys)[h]
                              : keys[h];
    }
    __device__ const dev::ValueDevice::Params& value_params(int sequence, int h) const {
        return kin != nullptr
                   ? static_cast<const dev::ValueDevice::Params*>(kin[sequence].values)[h]
                   : values[h];
    }
};

/// The KV-head units a launch covers: store.heads for one sequence (in store.pool), or for a
/// batch (CudaCodecBatch) batch * store.heads, unit u being head u % store.heads of sequence
/// u / store.heads, whose pages are in pools[u / store.heads] and whose codecs are the store's
/// (or, for kin caches, that sequence's: Store::kin).
template <class Codec>
struct UnitSet {
    Store<Codec> store;
    int units = 0;
    const uint8_t* const* pools = nullptr;
    /// A batch of sliding windows: sequence s's page table (its pool's mapping), where the
    /// store's identity table does not hold.
    const int32_t* const* page_tables = nullptr;

    __device__ int head(int u) const { return pools != nullptr ? u % store.heads : u; }
    __device__ int sequence(int u) const { return pools != nullptr ? u / store.heads : 0; }
    __device__ const typename Codec::Params& key_params(int u) const {
        return store.key_params(sequence(u), head(u));
    }
    __device__ const dev::ValueDevice::Params& value_params(int u) const {
        return store.value_params(sequence(u), head(u));
    }
    __device__ uint8_t* page(int u, int pos) const {
        uint8_t* pool =
            pools != nullptr ? const_cast<uint8_t*>(pools[u / store.heads]) : store.pool;
        const int32_t* table =
            page_tables != nullptr ? page_tables[u / store.heads] : store.page_table;
        return pool + static_cast<uint64_t>(table[pos / kPage]) * store.page_bytes;
    }
};

template <class Codec>
struct EncodeParams : UnitSet<Codec> {
    int start = 0, n = 0;
    const float* keys =
        nullptr;  ///< [units][n][d]; null where a key kernel of its own encodes them
    /// [units][n][d]; null where encode_values_kernel (value_encode.cuh) encodes the values
    const float* values = nullptr;
    /// A batch's units write from position starts[sequence] on; one sequence's from `start`.
    const int32_t* starts = nullptr;

    __device__ int pos(int u, int t) const {
        return (this->pools != nullptr ? starts[this->sequence(u)] : start) + t;
    }
};

template <class Codec>
__global__ void __launch_bounds__(kThreads) codec_encode_kernel(const EncodeParams<Codec> a) {
    const long long item = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
    if (item >= static_cast<long long>(a.units) * a.n) return;
    const int u = static_cast<int>(item / a.n), t = static_cast<int>(item % a.n);
    const int h = a.head(u), pos = a.pos(u, t);
    const HeadRegions R = a.store.regions[h];
    uint8_t* page = a.page(u, pos);
    const int slot = pos % kPage;
    const size_t row = (static_cast<size_t>(u) * a.n + t) * a.store.d;
    if (a.keys != nullptr)
        Codec::encode(a.key_params(u), a.keys + row, pos,
                      page + R.key_codes + slot * R.key_code_bytes,
                      reinterpret_cast<float*>(page + R.key_scalars) + slot, kPage);
    if (a.values == nullptr) return;
    dev::ValueDevice::encode(a.value_params(u), a.values + row,
                             page + R.value_codes + slot * R.value_code_bytes,
                             reinterpret_cast<float*>(page + R.value_scalars) + slot);
}

/// Staged bytes per token (key codes here and in the attention, input rows in the encode):
/// rounded up to 4 bytes, then to an odd number of 4-byte words, so that lanes each reading the
/// same offset of their own rows hit 32 different banks.
__host__ __device__ constexpr int stage_stride(int bytes) {
    const int words = (bytes + 3) / 4;
    return 4 * (words % 2 == 0 ? words + 1 : words);
}

constexpr int kEncodeItems = 64;  // (head, token) items per encode CTA, one per thread

/// Dynamic shared memory of codec_encode_staged_kernel: kEncodeItems input rows (d floats at an
/// odd stride), then their codes.
__host__ __device__ constexpr size_t encode_smem_bytes(int d, int code_stride) {
    return kEncodeItems * (static_cast<size_t>(stage_stride(4 * d)) + code_stride);
}

/// codec_encode_kernel with the rows and codes in shared memory: the keys, then the values, of
/// kEncodeItems consecutive (unit, token) items (consecutive rows of the [units][n][d] inputs)
/// are staged by coalesced loads; thread i encodes row i into a staged code, so its row reads
/// and bit-field writes stay in shared memory, and the CTA copies the codes to their pages.
/// (Straight from and into global memory each lane walks its own row and code: 32 lines per
/// warp access, and read-modify-writes of code bytes in L2.)
template <class Codec>
__global__ void __launch_bounds__(kEncodeItems)
    codec_encode_staged_kernel(const EncodeParams<Codec> a, int code_stride) {
    extern __shared__ __align__(16) uint8_t encode_smem[];
    const int d = a.store.d, row_stride = stage_stride(4 * d) / 4;
    float* rows = reinterpret_cast<float*>(encode_smem);
    uint8_t* codes = encode_smem + kEncodeItems * stage_stride(4 * d);
    const long long first = static_cast<long long>(blockIdx.x) * kEncodeItems;
    const int items = static_cast<int>(
        min(static_cast<long long>(kEncodeItems), static_cast<long long>(a.units) * a.n - first));
    const int r = threadIdx.x;
    auto unit_of = [&](int i) { return static_cast<int>((first + i) / a.n); };
    auto pos_of = [&](int i) { return a.pos(unit_of(i), static_cast<int>((first + i) % a.n)); };
    for (int part = a.keys != nullptr ? 0 : 1; part < (a.values != nullptr ? 2 : 1);
         ++part) {  // keys, then values
        const float* src = (part == 0 ? a.keys : a.values) + first * d;
        for (int i = 0; i < items; ++i)
            for (int c = r; c < d; c += kEncodeItems)
                rows[i * row_stride + c] = src[static_cast<size_t>(i) * d + c];
        __syncthreads();
        if (r < items) {
            const int h = a.head(unit_of(r)), pos = pos_of(r), slot = pos % kPage;
            const HeadRegions R = a.store.regions[h];
            uint8_t* page = a.page(unit_of(r), pos);
            uint8_t* code = codes + r * code_stride;
            if (part == 0)
                Codec::encode(a.key_params(unit_of(r)), rows + r * row_stride, pos, code,
                              reinterpret_cast<float*>(page + R.key_scalars) + slot, kPage);
            else
                dev::ValueDevice::encode(a.value_params(unit_of(r)), rows + r * row_stride, code,
                                         reinterpret_cast<float*>(page + R.value_scalars) + slot);
        }
        __syncthreads();
        for (int i = 0; i < items; ++i) {
            const int pos = pos_of(i);
            const HeadRegions R = a.store.regions[a.head(unit_of(i))];
            const uint32_t bytes = part == 0 ? R.key_code_bytes : R.value_code_bytes;
            uint8_t* dst = a.page(unit_of(i), pos) + (part == 0 ? R.key_codes : R.value_codes) +
                           (pos % kPage) * bytes;
            for (uint32_t b = r; b < bytes; b += kEncodeItems) dst[b] = codes[i * code_stride + b];
        }
        __syncthreads();
    }
}

template <class Codec>
__global__ void __launch_bounds__(kThreads)
    codec_dequantize_kernel(const EncodeParams<Codec> a, float* keys, float* values) {
    const long long item = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
    if (item >= static_cast<long long>(a.store.heads) * a.n) return;
    const int h = static_cast<int>(item / a.n), t = static_cast<int>(item % a.n), pos = a.start + t;
    const HeadRegions R = a.store.regions[h];
    const uint8_t* page = a.store.page(pos);
    const int slot = pos % kPage;
    const size_t row = (static_cast<size_t>(h) * a.n + t) * a.store.d;
    Codec::decode(a.store.keys[h], page + R.key_codes + slot * R.key_code_bytes,
                  reinterpret_cast<const float*>(page + R.key_scalars) + slot, kPage, pos,
                  keys + row);
    dev::ValueDevice::decode(a.store.values[h], page + R.value_codes + slot * R.value_code_bytes,
                             reinterpret_cast<const float*>(page + R.value_scalars) + slot,
                             values + row);
}

template <class Codec>
struct AttentionParams : UnitSet<Codec> {
    int size = 0;       ///< tokens stored
    int n_queries = 0;  ///< queries per query head
    int group = 1;      ///< query heads per KV head
    int rows = 0;       ///< group * n_queries rows per KV head
    int causal = 0;
    float scale_log2 = 0.0f;         ///< softmax scale times log2(e)
    const float* queries = nullptr;  ///< [heads * group][n_queries][d]
    float* out = nullptr;            ///< [heads * group][n_queries][d]
    float* states = nullptr;         ///< [heads][rows][state_stride]
    int state_stride = 0;
    int rows_per_block = 1;    ///< rows of one attention CTA, at most the kernel's R
    int tokens_per_split = 0;  ///< a multiple of 32
    int splits = 1;
    int stage_key_stride = 0;          ///< bytes per token of the staged key codes (padded)
    int stage_value_stride = 0;        ///< bytes per token of the staged value codes (padded)
    int stage_key_scalars = 0;         ///< per-token key scalars staged (the heads' maximum)
    int stage_value_scalars = 0;       ///< per-token value scalars staged
    int feature_scores = kLaneScores;  ///< FeatureMode (codec_feature_scores.cuh)
    int key_table_floats = 0;      ///< shared memory for the key codec's table (the heads' most)
    int table_floats = 0;          ///< key + value tables (tables_floats), a multiple of 4
    float* partial_o = nullptr;    ///< [units][rows][splits][D]
    float2* partial_ml = nullptr;  ///< [units][rows][splits] (max, sum), log2 units
    /// A batch's units hold sizes[sequence] tokens each; one sequence's `size`.
    const int32_t* sizes = nullptr;
    CenterParams center;   ///< centred keys: W at center.offset of each row's state
    TokenWindow window;    ///< a sliding window's sinks and width (none: window.window = 0)
    OutlierView outliers;  ///< one sequence's outlier side store (none: records null)

    __device__ int size_of(int u) const {
        return this->pools != nullptr ? sizes[this->sequence(u)] : size;
    }
    /// The outlier side store of unit u's sequence (outliers.active() only): a batch's own view
    /// of that sequence, or `outliers` itself.
    __device__ const OutlierView& side_of(int u) const {
        return outliers.sequences != nullptr ? outliers.sequences[this->sequence(u)] : outliers;
    }
    __host__ __device__ StageSizes stage_sizes() const {
        // The codec's own state is the features' span: a centred launch's W lies after it.
        const int feature_span = center.damped != nullptr ? center.offset : state_stride;
        return {state_stride,      table_floats,        stage_key_stride, stage_value_stride,
                stage_key_scalars, stage_value_scalars, feature_scores,   feature_span};
    }
    /// Tokens row `row` of unit u attends to (causal: the chunk's queries end the sequence).
    __device__ int limit(int u, int row) const {
        const int n = size_of(u);
        return causal ? n - n_queries + row / group + 1 : n;
    }
    /// The positions a CTA's span skips (TokenWindow::gap, from the limit of its first row,
    /// row0, of unit u): span token v is position window.position(v, gap), and the span ends at
    /// its last row's limit minus the gap. A chunk's later rows skip more, so every CTA walks at
    /// most TokenWindow::span_bound tokens, not the whole chunk's span.
    __device__ int span_gap(int u, int row0) const { return window.gap(limit(u, row0)); }
    __device__ const float* query(int u, int row) const {
        const int qh = u * group + row % group, i = row / group;
        return queries + (static_cast<size_t>(qh) * n_queries + i) * this->store.d;
    }
    __device__ float* output(int u, int row) const {
        const int qh = u * group + row % group, i = row / group;
        return out + (static_cast<size_t>(qh) * n_queries + i) * this->store.d;
    }
    /// Entry e of the centre state of a row of unit u, from its query q (CenterParams): W_i =
    /// conj(q_i) mu_i A_i as real parts [P], then imaginary parts [P], then <q, mu> over the
    /// unturned coordinates (CenteredKeyCodec::prepare_query's order), zeros after.
    __device__ float center_entry(int u, const float* q, int e) const {
        const int P = center.pairs, d = this->store.d;
        const float* dm = center.damped[this->sequence(u)] + static_cast<size_t>(this->head(u)) * d;
        if (e < 2 * P) {
            const int i = e < P ? e : e - P;
            const int re = center.half_split ? i : 2 * i,
                      im = center.half_split ? i + P : 2 * i + 1;
            return e < P ? q[re] * dm[re] + q[im] * dm[im] : q[re] * dm[im] - q[im] * dm[re];
        }
        float rest = 0.0f;
        if (e == 2 * P)
            for (int j = 2 * P; j < d; ++j) rest += q[j] * dm[j];
        return rest;
    }
};

template <class Codec>
__global__ void __launch_bounds__(kThreads) codec_prepare_kernel(const AttentionParams<Codec> a) {
    const int item = blockIdx.x * kThreads + threadIdx.x;
    if (item >= a.units * a.rows) return;
    const int u = item / a.rows, row = item % a.rows;
    float* state = a.states + static_cast<size_t>(item) * a.state_stride;
    Codec::prepare(a.key_params(u), a.query(u, row), state);
    if (a.center.damped != nullptr)
        for (int e = 0; a.center.offset + e < a.state_stride; ++e)
            state[a.center.offset + e] = a.center_entry(u, a.query(u, row), e);
}

/// Every device codec's query state is affine in the query (rotations, sketches, projections,
/// inner products with fixed codewords, plus constant tables): state = c + M q (AffineState,
/// codec_params_view.h). The backend measures c and M on the host from the codec's own prepare
/// (at 0 and at each unit vector) and keeps only the rows of M that are not zero; the state then
/// costs one small GEMV per row instead of one thread's serial O(d^2) or O(m d) work.
// grid (units * rows, entry blocks of 32), kStateWarps warps: lane l takes entry 32 * block + l,
// warp w its terms j = w, w + kStateWarps, ..., and warp 0 adds the warps' sums in warp order.
// (One CTA a row, one thread an entry over every j: 13-26 us a decode step at 8 KV heads, its
// 32 CTAs waiting on one load batch after another; session m. Reading row_of and c beside the
// query and a warp's 16 terms at once, not four batches of 4, took 2-3 us off every generic
// decode step of one sequence on the H200, with the merge's change; session p.) f is the
// backend's; a batch of kin caches reads each sequence's own, whose stride may be shorter than
// the launch's: the entries past it are zero and no score reads them.
constexpr int kStateWarps = 8;

/// x + sum over t < N of M[j + t kStateWarps][k] q[j + t kStateWarps], in t order, with the N
/// loads of M issued before the first FMA.
template <int N>
__device__ __forceinline__ float add_terms(const float* mt, int varying, int k, const float* q,
                                           int j, float x) {
    float m[N];
#pragma unroll
    for (int t = 0; t < N; ++t) m[t] = mt[static_cast<size_t>(j + t * kStateWarps) * varying + k];
#pragma unroll
    for (int t = 0; t < N; ++t) x = dev::fmadd(m[t], q[j + t * kStateWarps], x);
    return x;
}

template <class Codec>
__global__ void __launch_bounds__(kStateWarps * 32)
    codec_affine_prepare_kernel(const AttentionParams<Codec> a, AffineState f) {
    __shared__ float q[dev::kMaxDim];
    __shared__ float part[kStateWarps][32];
    const int item = blockIdx.x, u = item / a.rows, row = item % a.rows, d = a.store.d;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (a.store.kin != nullptr) f = a.store.kin[a.sequence(u)].affine;
    const size_t head = static_cast<size_t>(a.head(u)) * f.stride;
    const float* mt = f.matrix + static_cast<size_t>(a.head(u)) * d * f.varying;
    const int i = blockIdx.y * 32 + lane;
    // The row of M and the constant are read while the query is staged (one latency, not two).
    const int k = i < f.stride ? f.row_of[head + i] : -1;
    const float c = warp == 0 && i < f.stride ? f.constant[head + i] : 0.0f;
    const float* query = a.query(u, row);
    for (int j = threadIdx.x; j < d; j += blockDim.x) q[j] = query[j];
    __syncthreads();
    float x = 0.0f;
    if (k >= 0) {  // all of a warp's 16 terms' loads in flight at d = 128
        int j = warp;
        for (; j + 15 * kStateWarps < d; j += 16 * kStateWarps)
            x = add_terms<16>(mt, f.varying, k, q, j, x);
        for (; j + 3 * kStateWarps < d; j += 4 * kStateWarps)
            x = add_terms<4>(mt, f.varying, k, q, j, x);
        for (; j < d; j += kStateWarps) x = add_terms<1>(mt, f.varying, k, q, j, x);
    }
    part[warp][lane] = x;
    __syncthreads();
    if (warp == 0 && i < a.state_stride) {
        float s = c;
#pragma unroll
        for (int w = 0; w < kStateWarps; ++w) s += part[w][lane];
        if (i >= f.stride) s = 0.0f;
        if (a.center.damped != nullptr && i >= a.center.offset)
            s = a.center_entry(u, q, i - a.center.offset);
        a.states[static_cast<size_t>(item) * a.state_stride + i] = s;
    }
}

}  // namespace veloxquant::cuda::codec
