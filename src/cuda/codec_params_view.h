// What the generic kernels (codec_kernels.cuh) read one cache's codecs through, as plain device
// pointers: the key and value codecs' parameters of every KV head, and the affine form of the
// key codec's query state. A batch of caches that share their codecs passes caches[0]'s; a
// batch of kin caches (one config, layer and shape, each codec trained on its own sequence:
// rabitq's centroids) passes one view per sequence, so that one launch still reads every
// sequence with its own codecs (CudaCodecBatch).
#pragma once

#include <cuda_runtime.h>  // float2

#include <cstdint>

namespace veloxquant::cuda {

/// The key codec's query state as c + M q (codec_affine_prepare_kernel; measured on the host
/// by affine_state.h). `constant` is null where the state is not affine.
struct AffineState {
    const float* constant = nullptr;  ///< [heads][stride] c
    const float* matrix = nullptr;    ///< [heads][d][varying] M^T of the varying rows
    const int* row_of = nullptr;      ///< [heads][stride]: varying row of entry i, or -1
    int varying = 0;                  ///< varying rows per head (padded to the maximum)
    int stride = 0;                   ///< state floats per head in constant and row_of
};

/// Centred keys (center_keys, cuda/key_center.h) as the generic attention reads them: the cache
/// codes k - c_b, and a row's score of a token in block b (64 positions, a page) gets
/// <q, c_b> = sum_i Re(W_i exp(j 64 b w_i)) + <q, mu> over the unturned coordinates back, with
/// W_i = conj(q_i) mu_i A_i (CenteredKeyCodec::prepare_query). The prepare kernels append W's
/// real parts [P], imaginary parts [P] and that sum to each row's state, at `offset`.
struct CenterParams {
    const float* const* damped = nullptr;  ///< [batch] -> [heads][d] mu_i A_i; null: not centred
    const float2* phases = nullptr;        ///< [pages][P] cos, sin of 64 page w_i (page rows)
    int pairs = 0;                         ///< turned pairs P
    int half_split = 0;                    ///< pair i is (i, i + P), else (2i, 2i + 1)
    int offset = 0;                        ///< where a row's state holds W
    /// Floats W takes in a row's state (a multiple of 4, as the states' stride).
    static constexpr int floats(int pairs) { return (2 * pairs + 1 + 3) / 4 * 4; }
};

/// A sliding window (SlidingWindowKVCache on the device) as the generic attention reads it: a row
/// whose causal bound is `limit` (it sees positions < limit) attends the first `sinks` positions
/// and those in [limit - window, limit); window = 0 means every position below the limit. The
/// pages wholly inside [sinks, first limit - window) of a launch's first row are evicted: a launch
/// walks a span of tokens, the sink pages then the pages from that row's window on, and maps
/// span token v to its position (position()). Pages are kPageTokens tokens.
struct TokenWindow {
    static constexpr int kPageTokens = 64;
    int sinks = 0;
    int window = 0;

    /// The first position after the sink pages.
    __host__ __device__ int sink_end() const {
        return (sinks + kPageTokens - 1) / kPageTokens * kPageTokens;
    }
    /// Positions the span skips between the sink pages and the page of first_limit - window
    /// (a multiple of kPageTokens; 0 without a window).
    __host__ __device__ int gap(int first_limit) const {
        if (window <= 0 || first_limit - window <= sink_end()) return 0;
        return (first_limit - window) / kPageTokens * kPageTokens - sink_end();
    }
    /// The position of span token v, for a span of this gap.
    __host__ __device__ int position(int v, int gap) const { return v < sink_end() ? v : v + gap; }
    /// The longest span a block of rows walks whose limits are `queries` consecutive positions
    /// (rows of one chunk): its gap comes from its first row, so the span ends at most
    /// sink_end + window + 63 + (queries - 1) tokens on; `full` (the span from the chunk's first
    /// row) where that is shorter or there is no window.
    __host__ __device__ int span_bound(int queries, int full) const {
        if (window <= 0) return full;
        const long long bound = static_cast<long long>(sink_end()) + window + queries + 62;
        return bound < full ? static_cast<int>(bound) : full;
    }
    /// Whether a row of this limit attends position t (no window: t < limit).
    __host__ __device__ bool visible(int t, int limit) const {
        const int width = window > 0 ? window : 0x7fffffff;
        return t < limit && (t >= limit - width || t < sinks);
    }
};

/// The outlier side store (DeviceOutlierStore, device_outliers.h) as the generic attention reads
/// it. Tokens the KeyNormObserver flagged keep their codes in the pages, but the attention skips
/// them there (bit t % 32 of mask word t / 32 of their head) and scores them exactly from their
/// int8 or fp16 records instead, merged into the same softmax (codec_merge_kernel), as the CPU's
/// paged attention does. `records` null: no entry (nothing to skip or add). A batch's launch
/// (CudaCodecBatch) reads each sequence's own view from `sequences`, and the attention kernel
/// each unit's mask row from `mask_rows` (one load a chunk, as one sequence's `mask`).
struct OutlierView {
    const uint8_t* records = nullptr;    ///< [heads][capacity] entries: key vector, value vector
    const int32_t* positions = nullptr;  ///< [heads][capacity], increasing within a head
    const int32_t* counts = nullptr;     ///< [heads] entries held
    const uint32_t* mask = nullptr;      ///< [heads][mask_words]
    int capacity = 0;                    ///< entries a head's arrays hold
    int mask_words = 0;
    int bits = 8;          ///< 8: int8 codes then a float scale; 16: fp16
    int vector_bytes = 0;  ///< bytes of one key or value vector
    /// A batch: device [batch] each sequence's view (records null where it holds no entry),
    /// and [batch * heads] each unit's mask row (null there); the fields above unused.
    const OutlierView* sequences = nullptr;
    const uint32_t* const* mask_rows = nullptr;

    /// The mask row of unit u, head h (active() only; null: nothing to skip).
    __host__ __device__ const uint32_t* mask_row(int u, int h) const {
        return mask_rows != nullptr ? mask_rows[u] : mask + static_cast<size_t>(h) * mask_words;
    }

    /// Whether a launch has entries to skip and add (in some sequence, for a batch's view).
    __host__ __device__ bool active() const { return records != nullptr || sequences != nullptr; }
};

/// One cache's device parameters (pointers into its backend's allocations).
struct CodecParamsView {
    const void* keys = nullptr;    ///< [heads] the key codec's Params
    const void* values = nullptr;  ///< [heads] dev::ValueDevice::Params
    AffineState affine;
    int state_stride = 0;        ///< query-state floats per row (the heads' most, padded)
    int key_table_floats = 0;    ///< shared memory of the key codec's table (the heads' most)
    int value_table_floats = 0;  ///< and of the value codec's
    int feature_mode = 0;        ///< the scores every head allows (codec::FeatureMode)
};

/// A batch of kin caches as one launch reads them: `views` [batch] on the device, and the
/// largest of their sizes (each sequence's state and tables fit in what the launch reserves).
struct KinParams {
    const CodecParamsView* views = nullptr;  ///< null: the sequences share the backend's codecs
    int state_stride = 0, key_table_floats = 0, value_table_floats = 0;
    int feature_mode = 0;  ///< the scores every sequence's codecs allow (codec::FeatureMode)
    bool affine = false;   ///< every sequence's query state has its affine form
};

}  // namespace veloxquant::cuda
