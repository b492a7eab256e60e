// Split-K decode attention on the turboquant_rvq / value-codec page layout with tensor cores:
// scores S^T = K_codes x Q' (rows: 16 tokens; columns: the GQA group's rotated queries, split
// into hi + lo parts for groups of up to 4 and for integer scores), an online softmax, and O^T +=
// V_codes^T x P'^T in the value rotation's domain (mma m16n8k16, fp16; 1-bit keys, and 2-bit keys
// of groups of up to 4 or in mixed rows, score with integer mma m16n8k32). The operands' fragment
// layouts: decode_fragments.cuh; the scores of a page: decode_scores.cuh; its online softmax:
// decode_softmax.cuh; its values: decode_values.cuh. Each CTA takes one KV head and a page range of
// one sequence and writes its partial state (write_split_state); merge_kernel
// (turboquant_kernels.cuh) combines the splits and applies the inverse value rotation once. Shared
// memory (decode_layout.cuh): DecodeShared, lane copies of the lookup tables, then one cp.async
// ring of whole pages per warp, whose first pages are requested before the CTA's set-up; or, at
// 4-bit values with 4-bit keys or two 2-bit key stages and at 2-bit values with 1-bit keys, mixed
// rows of the value table and the page rings.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/decode_fragments.cuh"
#include "cuda/decode_layout.cuh"
#include "cuda/decode_scores.cuh"
#include "cuda/decode_softmax.cuh"
#include "cuda/decode_values.cuh"
#include "cuda/turboquant_kernels.cuh"

namespace veloxquant::cuda::kernels {

/// HILO: group <= 4, score and P' columns 2h, 2h + 1 are the fp16 hi and lo parts of head h (P'
/// lo is zero but at 4-bit keys and values); otherwise (group 5..8) column h is head h, but where
/// integer scores take two blocks of four heads, whose P' columns 2t, 2t + 1 are heads t, t + 4
/// (the heads of thread t's slots, as write_split_state reads them). MIXED: the
/// mixed-row layout (decode_layout.cuh). 4-bit keys and values, and every mixed-row kernel, are
/// held to 168 registers, so that three CTAs fit per SM as their shared memory allows (left free,
/// ptxas took 211 for the contiguous tables). WARPS: warps per CTA; with 8 (head_dim 64, mixed
/// rows: 123 and 117 registers) two CTAs of one table each give an SM 16 warps instead of 12.
template <int D, int KBITS, int VBITS, bool HILO, int LUTC, int VC, bool MIXED = false,
          int WARPS = kDecodeWarps>
__global__ void __launch_bounds__(WARPS * 32, WARPS == 8                            ? 2
                                              : (KBITS == 4 && VBITS == 4) || MIXED ? 3
                                                                                    : 0)
    decode_attention_kernel(const DecodeKernelParams kp) {
    constexpr int E = D / 32;
    constexpr int kCoords = D / 4;                  // key coordinates per lane per stage
    constexpr int kKeyChunk = kCoords * KBITS / 8;  // bytes
    constexpr int kKeyWords = (kKeyChunk + 3) / 4;
    constexpr int kKBlocks = D / 16;
    constexpr int kDims = D / 8;  // value dimensions per lane group
    constexpr int kVTiles = D / 16;
    constexpr int kValueChunk = kDims * VBITS / 8;  // bytes
    constexpr int kSlots = HILO ? 1 : 2;            // heads among a thread's two score columns
    static_assert(D == 64 || D == 128, "head_dim 64 or 128");
    static_assert(KBITS >= 1 && KBITS <= 4, "key bits 1..4");
    static_assert(VBITS == 1 || VBITS == 2 || VBITS == 4 || VBITS == 16, "value bits 1, 2, 4, 16");
    static_assert(kCoords * KBITS % 16 == 0, "a lane's key chunk starts on a 2-byte boundary");
    static_assert(KBITS > 1 || kCoords <= 32, "a lane's 1-bit key chunk is one 32-bit word");
    static_assert(LUTC == 1 || LUTC == 16 || LUTC == 32,
                  "1, 16 or 32 lane copies of the pair tables");
    static_assert(!MIXED || ((KBITS == 4 || KBITS == 2) && VBITS == 4 && LUTC == 32) ||
                      (KBITS == 1 && VBITS == 2 && VC == 16),
                  "mixed rows hold the 4-bit value table's 32 lane copies (beside 4-bit keys of "
                  "the same table or 2-bit keys) or the 2-bit value table's 16 (1-bit keys)");
    // Mixed rows: key stages of a page (one 4-bit or 1-bit stage, or two 2-bit stages), code
    // bytes of a token's keys and values, of a page, pages per warp and ring rows of a warp.
    constexpr int kMixedStages = KBITS == 2 ? 2 : 1;
    constexpr int kKeyTok = D * KBITS * kMixedStages / 8, kValueTok = D * VBITS / 8;
    constexpr int kPageCodes = kPage * (kKeyTok + kValueTok);
    constexpr int kMixedRing = decode_mixed_ring(kPageCodes, VBITS);
    constexpr int kMixedRows = kMixedRing * kPageCodes / 128;
    static_assert(!MIXED || (kPageCodes % 128 == 0 && WARPS * kMixedRows <= 256),
                  "whole mixed rows, 256 of them");
    constexpr bool kKeyCopies = LUTC > 1 && KBITS == 4 && !MIXED,
                   kValueCopies = LUTC > 1 && VBITS == 4 && !MIXED;
    constexpr int kLutShift = LUTC == 32   ? 7
                              : LUTC == 16 ? 6
                                           : 2;  // log2 of an entry's stride in bytes
    constexpr int kKeyShift = kKeyCopies ? kLutShift : 2,
                  kValueShift = kValueCopies ? kLutShift : 2;
    // 1-bit keys, and 2-bit keys in groups of up to 4 or in mixed rows: integer scores
    // (query_fragments_i8), the query heads in blocks of four (hi and lo columns): one block for
    // groups of up to 4, two for 5..8, whose thread t then holds heads t and t + 4 (slots 0 and
    // 1). Two blocks at 2-bit keys sum every stage in one fixed-point scale, tile by tile
    // (scores_2bit_i8_two_blocks); in the general kernel they score in fp16.
    constexpr bool kI8TwoBlocks = KBITS == 2 && !HILO && MIXED;
    constexpr bool kI8 = KBITS == 1 || (KBITS == 2 && HILO) || kI8TwoBlocks;
    constexpr int kI8Blocks = D / 32;  // k32 blocks: thread t gives 8 of its coordinates to each
    constexpr int kHeadBlocks = HILO ? 1 : 2;
    // P' to the B fragments of P'^T by movmatrix, or through shared memory (decode_fragments.cuh)
    constexpr bool kTransposeInRegisters = !(KBITS == 4 && VBITS == 4);
    using Shared = DecodeShared<D, KBITS, VBITS, LUTC, WARPS>;

    extern __shared__ __align__(128) uint8_t smem_raw[];
    Shared& sh = *reinterpret_cast<Shared*>(smem_raw);
    const DecodeArgs& a = kp.args;
    const TqPageLayout& L = a.layout;
    uint32_t* copies = reinterpret_cast<uint32_t*>(smem_raw + decode_ring_offset(sizeof(Shared)));
    constexpr int kVC = VBITS == 2 ? VC : 0;
    constexpr bool kV64 = kVC > 0;
    constexpr int kValueByteCopies = kV64 ? kVC : 1;
    // 2-bit values, or 4-bit values beside 2-bit keys, in mixed rows, the group's heads in hi + lo
    // columns (HILO): P' would leave the lo columns zero, so they carry a second dimension of the
    // same token instead (dim_pair_selectors): a table entry's registers then need no pairing of
    // two tokens' codes, and O^T is D / 32 tiles of 32 dimensions (columns 2h, 2h + 1: two
    // dimensions of head h), kept twice (tokens t, t + 4 and t + 8, t + 12 of each block: the two
    // accumulators' mma chains are half as long; one accumulator measured 0.9% slower at head_dim
    // 64) and summed at the end.
    constexpr bool kDimPairs = MIXED && HILO && (kV64 || (VBITS == 4 && kTransposeInRegisters));
    static_assert(VC == 0 || VC == 16, "0 or 16 copies of the byte-indexed value table");
    uint8_t* v64_table = smem_raw + decode_ring_offset(sizeof(Shared)) +
                         decode_lut_bytes(KBITS, L.key_stages, VBITS, LUTC, kp.shared_pairs);
    uint8_t* rings = smem_raw + decode_ring_offset(decode_ring_offset(sizeof(Shared)) +
                                                   decode_lut_bytes(KBITS, L.key_stages, VBITS,
                                                                    LUTC, kp.shared_pairs) +
                                                   decode_v64_bytes(VBITS, kVC));

    const TqDeviceTables& T = a.tables;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    // Mixed rows: ring byte x of this warp's ring (page slot x / kPageCodes: its keys, then its
    // values) lies at byte 128 + (x % 128) of row kMixedRows warp + x / 128 (mixed_delta).
    constexpr size_t kMixedOffset = decode_ring_offset(sizeof(Shared));
    constexpr int kKeyBytes = kPage * kKeyTok;  // of a page's keys in the mixed rows
    uint8_t* mixed = smem_raw + kMixedOffset;
    auto mixed_at = [&](uint32_t x) {
        return mixed + 128 + static_cast<size_t>(warp) * kMixedRows * 256 + 2 * x - (x & 127);
    };
    float* mixed_norms = reinterpret_cast<float*>(mixed + 256 * 256) + warp * kMixedRing * kPage;
    constexpr int kScalesAfterNorms = WARPS * kMixedRing * kPage;  // floats
    float* mixed_scales = mixed_norms + kScalesAfterNorms;
    // There a slot's norms (and scales) lie transposed, but at two 2-bit key stages (1.3% slower
    // at head_dim 128 that way): the tokens 16 mt + 8 r + rho (mt < 4, r < 2) that score row
    // rho's threads read are floats 8 rho .. 8 rho + 7 (k = 2 mt + r), in two 16-byte blocks,
    // block h at float4 2 rho + (h ^ rho / 4): two LDS.128 a thread instead of 8 LDS, the 8 rows'
    // blocks on distinct banks. Lane l copies tokens l and l + 32 there, 4 bytes each (32
    // distinct banks).
    constexpr bool kTransposedFloats = MIXED && KBITS != 2;
    auto transposed = [](int token) {
        const int rho = token & 7, k = token >> 3;
        return 8 * rho + 4 * ((k >> 2) ^ (rho >> 2)) + (k & 3);
    };
    const int lane_word0 = transposed(lane), lane_word1 = transposed(lane + 32);
    constexpr uint32_t kMixedTable = kDynamicSharedBase + kMixedOffset;
    const uint32_t window = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
    const uint32_t lane4 = (window & 0xFFFF0000u) | (4 * lane);
    const uint32_t lane8 = (window & 0xFFFF0000u) | (8 * (lane & 15));
    if (MIXED && (window & 0xFFFFu) != kDynamicSharedBase) __trap();  // not the layout assumed
    // The merge (a programmatic dependent on sm_90) may launch once every CTA of this grid has
    // started: its CTAs take the SMs whose decode CTAs have ended and wait there for this grid's
    // end, instead of launching after it.
    allow_dependent_grid_launch();
    // Grid: split-major over the units (sequence, KV head), so that the short tail splits
    // launch last, onto the SMs whose head splits end first.
    const int units = a.batch * L.num_kv_heads, unit = blockIdx.x % units;
    const int split = blockIdx.x / units, kvh = unit % L.num_kv_heads, b = unit / L.num_kv_heads;
    const int G = a.group;
    const int len = a.seq_lens != nullptr ? a.seq_lens[b] : a.seq_len;
    // A sliding window (general kernels only): the CTA walks a span of `span` tokens, the sink
    // pages and then the pages from the window's first on (span page v is page v, or v +
    // gap_pages past the sink pages), and masks span tokens [mask_lo, mask_hi): those past the
    // sinks and before the window. Without one the span is the sequence and nothing is masked.
    int span = len, sink_pages = 0, gap_pages = 0, mask_lo = 0, mask_hi = 0;
    if (!MIXED && a.window.window > 0) {
        const int gap = a.window.gap(len);
        span = len - gap, gap_pages = gap / kPage, sink_pages = a.window.sink_end() / kPage;
        mask_lo = a.window.sinks, mask_hi = len - a.window.window - gap;
    }
    const int n_pages = (span + kPage - 1) / kPage;
    const PageRange range = split_range(kp.split, split, n_pages);
    const int p_begin = range.begin, p_end = range.end;

    // Per-warp cp.async ring of S pages, refilled as each page is read; the first S pages are in
    // flight while the CTA sets up its tables and queries. With one slot it refills in halves,
    // the keys and norms (part 0) and the values and scales (part 1), so the next keys load while
    // this page's values are read; deeper rings load whole pages (part 2), as halves measured 2-4%
    // slower there.
    const int S = MIXED ? kMixedRing : kp.ring;
    static_assert(!MIXED || (kKeyBytes % 512 == 0 && kPage * kValueTok % 512 == 0),
                  "a page's key and value codes are whole rounds of the warp's 16-byte copies");
    uint8_t* mixed_lane = mixed_at(16 * lane);  // this lane's first chunk of a ring slot
    const bool halves = S == 1;
    uint8_t* ring = rings + static_cast<size_t>(warp) * S * L.head_bytes;
    const int first = p_begin + warp;
    const int count = p_end > first ? (p_end - first + WARPS - 1) / WARPS : 0;
    const int32_t* table = a.page_tables != nullptr
                               ? a.page_tables[b]
                               : a.page_table + static_cast<size_t>(b) * a.page_table_stride;
    // The pool index of span page v (general kernels).
    auto page_entry = [&](int v) { return table[v < sink_pages ? v : v + gap_pages]; };
    const uint8_t* pool = a.pools != nullptr ? a.pools[b] : a.pool;  // this sequence's pages
    const uint32_t key_chunks = L.value_codes_offset / 16, page_chunks = L.head_bytes / 16;
    // Page i lies in ring slot i % S.
    // Pool index of the page issued next and of the one after: each is read from the page table a
    // page ahead of its copy, so the copy's address never waits on that global load (ncu: 6% of
    // the stall samples did).
    int32_t index_now = 0, index_next = 0;
    // Mixed rows: the slice's block offsets are constants, the pool's page stride fits 32 bits
    // (the launcher checks both), this lane's source chunk and the page table's next entry are
    // kept (fewer instructions a page than the general addresses).
    constexpr MixedSliceOffsets kSlice = mixed_slice_offsets(kKeyTok, kValueTok);
    const uint8_t* lane_source = pool + kvh * kSlice.head_bytes + 16 * lane;
    const uint32_t page_stride = static_cast<uint32_t>(L.page_bytes);
    const int32_t* next_entry = table + first + WARPS;
    // Mixed rows: each copy's per-lane addresses, held in registers for the whole CTA: the 16-byte
    // chunks' source and ring slot 0's row, the floats' source (token lane's word) and their
    // transposed places in slot 0 (left to ptxas, it rebuilt them from the lane index at every
    // page: ~30 instructions a page at head_dim 64).
    const uint8_t* float_source = lane_source - 12 * lane;
    uint32_t ring_at = static_cast<uint32_t>(__cvta_generic_to_shared(mixed_lane));
    uint32_t norm_at0 = static_cast<uint32_t>(__cvta_generic_to_shared(mixed_norms + lane_word0));
    uint32_t norm_at1 = static_cast<uint32_t>(__cvta_generic_to_shared(mixed_norms + lane_word1));
    if constexpr (MIXED) {
        pin_register(lane_source), pin_register(float_source);
        // Through an identity PRMT, opaque to ptxas: CUDA 13.0's takes them apart into a lane
        // part and the uniform window base for the L2-hinted copies' [R + UR + imm] form, which
        // it encodes with an unset uniform pair (an illegal instruction at d = 64).
        ring_at = permute_bytes(ring_at, 0u, 0x3210u);
        norm_at0 = permute_bytes(norm_at0, 0u, 0x3210u);
        norm_at1 = permute_bytes(norm_at1, 0u, 0x3210u);
        pin_register(ring_at), pin_register(norm_at0), pin_register(norm_at1);
    }
    constexpr int kScalesAt = 4 * kScalesAfterNorms;  // bytes from a slot's norms to its scales
    const uint64_t page_policy = kp.page_policy;      // L2 policy of the page copies (evict-first)
    auto issue = [&](int i, int part, int slot, bool read_next = true) {
        if (part != 1) {  // the first part of page i
            index_now = index_next;
            if (MIXED && read_next) {
                if (i + 1 < count) index_next = *next_entry;
                next_entry += WARPS;
            } else if (read_next && i + 1 < count) {
                index_next = page_entry(first + WARPS * (i + 1));
            }
        }
        if (MIXED && i < count) {
            // Lane l copies 16-byte chunks l + 32 j: 512 ring bytes (4 row halves) apart, so the
            // rows' addresses step by 1024 bytes, immediates of the copies.
            const uint64_t page_offset =
                static_cast<uint64_t>(static_cast<uint32_t>(index_now)) * page_stride;
            const uint8_t* page = lane_source + page_offset;
            const uint8_t* floats = float_source + page_offset;      // token lane's word
            const uint32_t codes = ring_at + 2 * slot * kPageCodes;  // (multiples of 128 double)
            const uint32_t slot_norms = 4 * slot * kPage;
            if (part != 1) {
#pragma unroll
                for (int j = 0; j < kKeyBytes / 512; ++j)
                    cp_async_hinted_at<16>(codes + 1024 * j, page + 512 * j, page_policy);
                if constexpr (kTransposedFloats) {
                    cp_async_hinted_at<4>(norm_at0 + slot_norms, floats + kSlice.norms,
                                          page_policy);
                    cp_async_hinted_at<4>(norm_at1 + slot_norms, floats + kSlice.norms + 128,
                                          page_policy);
                } else if (lane < kPage / 4) {
                    cp_async<16>(mixed_norms + slot * kPage + 4 * lane, page + kSlice.norms);
                }
            }
            if (part != 0) {
#pragma unroll
                for (int j = 0; j < kPage * kValueTok / 512; ++j)
                    cp_async_hinted_at<16>(codes + 2 * kKeyBytes + 1024 * j,
                                           page + kSlice.values + 512 * j, page_policy);
                if constexpr (kTransposedFloats) {
                    cp_async_hinted_at<4>(norm_at0 + kScalesAt + slot_norms, floats + kSlice.scales,
                                          page_policy);
                    cp_async_hinted_at<4>(norm_at1 + kScalesAt + slot_norms,
                                          floats + kSlice.scales + 128, page_policy);
                } else if (lane < kPage / 4) {
                    cp_async<16>(mixed_scales + slot * kPage + 4 * lane, page + kSlice.scales);
                }
            }
        } else if (i < count) {
            const uint8_t* page = pool + static_cast<size_t>(index_now) * L.page_bytes +
                                  static_cast<size_t>(kvh) * L.head_bytes;
            const uint4* src = reinterpret_cast<const uint4*>(page);
            uint4* dst = reinterpret_cast<uint4*>(ring + slot * L.head_bytes);
            const uint32_t end = part == 0 ? key_chunks : page_chunks;
            for (uint32_t c = (part == 1 ? key_chunks : 0) + lane; c < end; c += 32)
                cp_async_hinted_at<16>(static_cast<uint32_t>(__cvta_generic_to_shared(dst + c)),
                                       src + c, page_policy);
        }
        cp_async_commit();
    };
    // The CTA's small global reads go out first, in one round: the page-table entries of the
    // ring's first pages and of the one after, the stage weights, the 2-bit value pairs, the
    // group's queries and the key signs. (Read where each is used, the second page's entry waited
    // behind the first page's copies, and the rest behind every CTA's first pages.)
    int32_t head_index[kMaxDecodeRing + 1];
#pragma unroll
    for (int i = 0; i <= kMaxDecodeRing; ++i)
        head_index[i] = i <= S && i < count ? page_entry(first + WARPS * i) : 0;
    static_assert(kMaxStages * 2 <= WARPS * 32, "a stage weight per thread");
    const float affine_in = threadIdx.x < L.key_stages * 2 ? T.key_affine[threadIdx.x] : 0.0f;
    const uint32_t pair_in = kV64 ? T.value_pairs[lane & 15] : 0u;
    constexpr int kWarpHeads = kMaxGroup / WARPS;  // heads warp, warp + WARPS, ...
    float q_in[kWarpHeads][E], sign_in[E];
#pragma unroll
    for (int e = 0; e < E; ++e) sign_in[e] = T.key_signs[kvh * D + lane * E + e];
#pragma unroll
    for (int j = 0; j < kWarpHeads; ++j) {
        const int h = warp + WARPS * j;  // past the group: zeros (loaded within the group)
        const float* q =
            a.queries +
            (static_cast<size_t>(b) * L.num_kv_heads * G + kvh * G + (h < G ? h : 0)) * D;
#pragma unroll
        for (int e = 0; e < E; ++e) q_in[j][e] = h < G ? q[lane * E + e] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kMaxDecodeRing; ++i) {
        if (i < S) {
            index_next = head_index[i];
            if (halves)
                issue(i, 0, i, false), issue(i, 1, i, false);
            else
                issue(i, 2, i, false);
        }
    }
#pragma unroll
    for (int i = 0; i <= kMaxDecodeRing; ++i)
        if (i == S) index_next = head_index[i];  // (a runtime index would put the array in memory)
    next_entry = table + first + WARPS * (S + 1);

    // Tables, and the group's queries rotated once (warp w rotates heads w, w + WARPS).
    if (threadIdx.x < L.key_stages * 2) sh.key_affine[threadIdx.x / 2][threadIdx.x % 2] = affine_in;
    if constexpr (KBITS > 1 && !kKeyCopies && !kI8)
        for (int i = threadIdx.x; i < L.key_stages * Shared::kKeyPairs; i += blockDim.x)
            sh.key_pairs[i / Shared::kKeyPairs][i % Shared::kKeyPairs] = T.key_pairs[i];
    // 2-bit keys' integer parts: each stage in its own scale (key_i8), or, where two head blocks
    // sum the stages' integer scores, every stage in one scale (key_i8_joint, whose weight
    // multiplies the sum).
    if constexpr (KBITS == 2 && kI8) {
        const uint32_t* key_i8 = kI8TwoBlocks ? T.key_i8_joint : T.key_i8;
        for (int i = threadIdx.x; i < L.key_stages * 2; i += blockDim.x)
            sh.key_i8[i / 2][i % 2] = key_i8[i];
    }
    [[maybe_unused]] const float i8_weight = T.key_i8_joint_weight;
    if constexpr (VBITS != 16 && !kValueCopies)
        for (int i = threadIdx.x; i < Shared::kValuePairs; i += blockDim.x)
            sh.value_pairs[i] = T.value_pairs[i];
    // Lane copies (a load per copy made the stores wait on each load: 2.4% of the stall samples).
    constexpr int kThreads = WARPS * 32;
    if constexpr (kKeyCopies)
        fill_lane_copies<kThreads>(copies, T.key_pairs, L.key_stages * 256, LUTC, LUTC);
    const int value_copies_at = kp.shared_pairs ? 0 : kKeyCopies ? L.key_stages * 256 * LUTC : 0;
    if constexpr (kValueCopies) {
        if (!kp.shared_pairs)
            fill_lane_copies<kThreads>(copies + value_copies_at, T.value_pairs, 256, LUTC, LUTC);
    }
    if constexpr (MIXED && VBITS == 4)
        fill_lane_copies<kThreads>(reinterpret_cast<uint32_t*>(mixed), T.value_pairs, 256, 32, 64);
    if constexpr (kV64) {  // entry e, copy c: uint2 16 e + c, or in mixed row e (32 uint2 a row)
        fill_value_byte_table<kThreads, MIXED ? 32 : kValueByteCopies>(
            reinterpret_cast<uint2*>(MIXED ? mixed : v64_table), pair_in);
    }
    const uint8_t* v64_lane = v64_table + (lane % kValueByteCopies) * sizeof(uint2);
    // This lane's copy of each table.
    const int copy = lane & (LUTC - 1);
    const uint32_t* value_table = kValueCopies ? copies + value_copies_at + copy : sh.value_pairs;
#pragma unroll
    for (int j = 0; j < kWarpHeads; ++j) {
        const int h = warp + WARPS * j;
        if (h >= G) {  // a padding column of the query fragments: zeros
#pragma unroll
            for (int e = 0; e < E; ++e) sh.q[h][lane * E + e] = 0.0f;
            if (lane == 0) sh.head_mul[h] = 1.0f, sh.head_add[h] = 0.0f;
            continue;
        }
        float x[E];
#pragma unroll
        for (int e = 0; e < E; ++e) x[e] = q_in[j][e] * sign_in[e];
        warp_fwht<E>(x, lane, T.inv_sqrt_d);
        float mx = 0.0f, sum = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) mx = fmaxf(mx, fabsf(x[e])), sum += x[e];
        mx = warp_max(mx);
        sum = warp_sum(sum);
        int ex = 0;
        frexpf(mx, &ex);
        const float up = mx > 0.0f ? ldexpf(1.0f, 8 - ex) : 1.0f;  // max |q'| in [128, 256)
#pragma unroll
        for (int e = 0; e < E; ++e) sh.q[h][lane * E + e] = x[e] * up;
        if (lane == 0) sh.head_mul[h] = 1.0f / up, sh.head_add[h] = T.key_c0_sum * sum;
    }
    __syncthreads();

    // Query fragments (B of the score mma), fixed for the whole CTA (decode_fragments.cuh).
    // (Rows G and up of sh.q are zeros: padding columns.)
    uint32_t bq[kI8 ? 1 : kKBlocks][2];
    if constexpr (!kI8) query_fragments_f16<D>(bq, sh.q[HILO ? g >> 1 : g], t, HILO && (g & 1));
    uint32_t bq8[kI8 ? kHeadBlocks : 1][kI8 ? kI8Blocks : 1][2];
    if constexpr (kI8) {
#pragma unroll
        for (int b = 0; b < kHeadBlocks; ++b)
            query_fragments_i8<D, KBITS>(bq8[b], sh.q[4 * b + (g >> 1)], t, g & 1);
    }
    // Heads of this thread's score columns.
    int heads[kSlots];
    float mul[kSlots], add[kSlots];
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
        heads[j] = HILO ? t : kI8 ? t + 4 * j : 2 * t + j;
        // logit (log2 units) = (score mul + add) norm
        const float scale_log2 = a.scale * 1.4426950408889634f;
        mul[j] = sh.head_mul[heads[j]] * (kI8 ? scale_log2 / 127.0f : scale_log2);
        add[j] = sh.head_add[heads[j]] * scale_log2;
    }
    // 1-bit keys in mixed rows (one stage) take the stage weight C1 - C0 into the multiplier.
    constexpr bool kFoldStageWeight = kI8 && KBITS == 1 && MIXED;
    if constexpr (kFoldStageWeight) {
#pragma unroll
        for (int j = 0; j < kSlots; ++j) mul[j] *= sh.key_affine[0][1];
    }
    // 1-bit keys at head_dim 64: the key bytes' offset (key_byte_offset_d64), the same in every
    // stage's sum, comes off the additive term, weighted as the scores weigh the stages.
    if constexpr (kI8 && KBITS == 1 && D == 64) {
        int offset[kHeadBlocks];
        key_byte_offset_d64(bq8, t, offset);
        float weight = 1.0f;
        if constexpr (!kFoldStageWeight) {
            weight = 0.0f;
            for (int s = 0; s < L.key_stages; ++s) weight += sh.key_affine[s][1];
        }
#pragma unroll
        for (int j = 0; j < kSlots; ++j) add[j] -= mul[j] * weight * static_cast<float>(offset[j]);
    }
    // The value tables' scale enters P' through the softmax's exponent (p'' = value_pair_scale p),
    // so the running sums l are of p'' until the end.
    const float log2_pair = log2f(T.value_pair_scale);

    float o[kVTiles][4];
#pragma unroll
    for (int v = 0; v < kVTiles; ++v) o[v][0] = o[v][1] = o[v][2] = o[v][3] = 0.0f;
    // Running max and sum of each slot's head, the logits' shift and the max's threshold
    // (decode_softmax.cuh).
    float m_run[kSlots], l_run[kSlots], shift[kSlots], thr[kSlots];
#pragma unroll
    for (int j = 0; j < kSlots; ++j)
        m_run[j] = -INFINITY, l_run[j] = 0.0f, shift[j] = -log2_pair, thr[j] = -INFINITY;
    if constexpr (!kTransposeInRegisters) __syncthreads();  // sh.q is read: P' rows overwrite it
    // Score row g of a tile: token 4 (g % 2) + g / 2 of it, so that after movmatrix k position
    // 2t + i of P' is token t + 4i; through shared memory token g, its P' in row 2 (g % 4) + g / 4
    // (4% faster at 4-bit keys, whose 128-bit loads serve 8 lanes, tokens g and g + 1, at once).
    const int row_token = kTransposeInRegisters ? 4 * (g & 1) + (g >> 1) : g;
    // Dimension pairs: the selectors of this thread's column g (dim_pair_selectors).
    [[maybe_unused]] uint2 pair_sel = dim_pair_selectors(g);
    if constexpr (kDimPairs) pin_register(pair_sel.x), pin_register(pair_sel.y);
    uint8_t* pbuf = reinterpret_cast<uint8_t*>(sh.p[warp]);
    // This thread's P' entry, as a base and immediate offsets (ptxas rebuilt each row's address).
    uint8_t* prow = pbuf + (2 * (g & 3) + (g >> 2)) * 16 + 4 * t;
    // This thread's per-token floats of a slot (norms or value scales): tokens 16 mt + 8 r +
    // row_token, as f[mt][r]; two LDS.128 of the transposed blocks where they are.
    const int block0 = 2 * row_token + (row_token >> 2), block1 = block0 + 1 - 2 * (row_token >> 2);
    auto token_floats = [&](const float* slot_floats, float(&f)[4][2]) {
        if constexpr (kTransposedFloats) {
            const float4 lo = reinterpret_cast<const float4*>(slot_floats)[block0];
            const float4 hi = reinterpret_cast<const float4*>(slot_floats)[block1];
            f[0][0] = lo.x, f[0][1] = lo.y, f[1][0] = lo.z, f[1][1] = lo.w;
            f[2][0] = hi.x, f[2][1] = hi.y, f[3][0] = hi.z, f[3][1] = hi.w;
        } else {
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
                f[mt][0] = slot_floats[16 * mt + row_token],
                f[mt][1] = slot_floats[16 * mt + 8 + row_token];
        }
    };
    // Mixed rows: this thread's first key chunk and value chunk in slot 0 (loop-invariant). Each
    // chunk read lies within one 128-byte row half, as mixed_delta needs: the chunks of a key
    // block of 8 tokens and of a value block of 4 tokens span a divisor or a multiple of 128 bytes.
    static_assert(!MIXED || ((128 % (8 * kKeyTok) == 0 || 8 * kKeyTok % 128 == 0) &&
                             (128 % (4 * kValueTok) == 0 || 4 * kValueTok % 128 == 0)),
                  "mixed-row chunks stay within their row halves");
    const uint8_t* mixed_keys = mixed_at(row_token * kKeyTok + t * kKeyChunk);
    const uint8_t* mixed_values = mixed_at(kKeyBytes + t * kValueTok + g * kValueChunk);
    // 2-bit values at head_dim 64 in mixed rows (a token's codes are one 16-byte row): each
    // LDSM.x4.trans gives the value chunks of two blocks. Matrix m of load p holds tokens 16 kb +
    // 8 (m % 2) + {0, 4, 1, 5, 2, 6, 3, 7} (kb = 2 p + m / 2), so that thread (g, t) gets the
    // chunks of tokens t and t + 4 (or t + 8 and t + 12) of column g in one register, as the
    // scores' k pairs hold them: 2 loads a page instead of 16.
    constexpr bool kValueMatrices = MIXED && kV64 && D == 64;
    // (The rows' shared address is pinned: ptxas rebuilt it from the lane and warp indices at
    // every other page, 12 instructions.)
    uint32_t value_rows = static_cast<uint32_t>(__cvta_generic_to_shared(
        mixed_at(kKeyBytes + kValueTok * (8 * (lane >> 3) + ((lane >> 1) & 3) + 4 * (lane & 1)))));
    if constexpr (kValueMatrices) pin_register(value_rows);
    // This thread's chunks of key stage s of tokens 16 mt + row_token (w0) and 16 mt + 8 +
    // row_token (w1), from the ring slot at buf or, in mixed rows, from the slot's keys (mixed_keys
    // moved to the slot).
    auto load_keys = [&](const uint8_t* buf, int s, int mt, uint32_t(&w0)[kKeyWords],
                         uint32_t(&w1)[kKeyWords]) {
        const uint8_t* row0 = MIXED ? buf + mixed_delta(16 * mt * kKeyTok) + s * (D * KBITS / 8)
                                    : buf + (16 * mt + row_token) * L.key_code_bytes +
                                          s * (D * KBITS / 8) + t * kKeyChunk;
        load_chunk<kKeyChunk>(row0, w0);
        load_chunk<kKeyChunk>(row0 + (MIXED ? mixed_delta(8 * kKeyTok) : 8 * L.key_code_bytes), w1);
    };

    // Centred keys: this warp's first page in the bias row of the group's head 0.
    const size_t bias_base =
        (static_cast<size_t>(b) * L.num_kv_heads + kvh) * G * a.page_bias_stride + first;

    // Page i in ring slot `slot_arg` (an integral_constant where the loop below unrolls by the
    // ring's two slots, so that every slot offset is an immediate).
    auto page_step = [&](int i, auto slot_arg) {
        using SlotArg = decltype(slot_arg);
        const int slot = [&] {
            if constexpr (std::is_same_v<SlotArg, int>)
                return slot_arg;
            else
                return SlotArg::value;
        }();
        // Centred keys: this page's bias for each slot's head, loaded first so that the scores
        // hide its latency (DecodeArgs::page_bias; 0 without it).
        float page_add[kSlots];
#pragma unroll
        for (int j = 0; j < kSlots; ++j)
            page_add[j] =
                a.page_bias != nullptr && heads[j] < G
                    ? __ldg(a.page_bias + bias_base +
                            static_cast<size_t>(heads[j]) * a.page_bias_stride + WARPS * i)
                    : 0.0f;
        cp_async_wait(halves ? 1 : S - 1);  // this page's keys (and values, unless halves)
        __syncwarp();
        // The slot's page: in the ring, or in mixed rows this thread's first key chunk of it
        const uint8_t* buf =
            MIXED ? mixed_keys + 2 * slot * kPageCodes : ring + slot * L.head_bytes;
        const int page_start = (first + WARPS * i) * kPage;  // in the span
        const int valid = span - page_start;                 // tokens of this page in use
        // The norms of this thread's 8 tokens, read before the scores so that their loads are
        // done when the logits need them.
        float norm[4][2];
        token_floats(MIXED ? mixed_norms + slot * kPage
                           : reinterpret_cast<const float*>(buf + L.key_norms_offset),
                     norm);

        // Scores of the page's 4 x 16 tokens (decode_scores.cuh).
        float sc[4][4];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) zero_tile(sc[mt]);
        constexpr int kStages = MIXED ? kMixedStages : 0;  // 0: the layout's
        if constexpr (kI8 && KBITS == 1) {
            scores_1bit_i8<D, kStages, kFoldStageWeight>(sc, L, load_keys, buf, bq8, sh.key_affine);
        } else if constexpr (kI8TwoBlocks) {
            scores_2bit_i8_two_blocks<D, kStages>(sc, load_keys, buf, bq8, sh.key_i8, i8_weight);
        } else if constexpr (kI8) {
            scores_2bit_i8<D, kStages>(sc, L, load_keys, buf, bq8[0], sh.key_i8, sh.key_affine);
        } else {
            auto pairs = [&](int s) {
                return kKeyCopies ? copies + s * 256 * LUTC + copy : sh.key_pairs[s];
            };
            scores_f16<D, KBITS, kStages, MIXED, kMixedTable, kKeyShift>(
                sc, L, load_keys, buf, bq, pairs, lane4, sh.key_affine);
        }

        // Logits (log2 units, less shift) and the online softmax of each slot's head.
        float x[4][2][kSlots];
        // Centred keys: the page's bias enters through the logits' shift (y = x + bias - shift).
        float logit_shift[kSlots];
#pragma unroll
        for (int j = 0; j < kSlots; ++j) logit_shift[j] = shift[j] - page_add[j];
        page_logits<kSlots, HILO && !kI8>(sc, mul, add, norm, logit_shift, valid,
                                          mask_lo - page_start, mask_hi - page_start, row_token, x);
        page_softmax(x, m_run, l_run, shift, thr, log2_pair, o);

        if (halves) {
            __syncwarp();  // every lane is done with the keys and norms: refill their half
            issue(i + 1, 0, 0);
            cp_async_wait(1);  // this page's values
            __syncwarp();
        }

        // P'^T: C rows (tokens) transposed into B's k pairs. The value scales are read before any
        // P' store, which ptxas does not move a shared load above (6% of the stall samples).
        float vscale[4][2] = {{1.0f, 1.0f}, {1.0f, 1.0f}, {1.0f, 1.0f}, {1.0f, 1.0f}};
        if constexpr (VBITS != 16)
            token_floats(MIXED ? mixed_scales + slot * kPage
                               : reinterpret_cast<const float*>(buf + L.value_scales_offset),
                         vscale);
        uint32_t bp[4][2];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float p0 = x[mt][r][0] * vscale[mt][r],
                            p1 = !HILO                   ? x[mt][r][kSlots - 1] * vscale[mt][r]
                                 : kDimPairs             ? p0
                                 : kTransposeInRegisters ? 0.0f
                                                         : p0 - __half2float(__float2half_rn(p0));
                const __half2 h = __floats2half2_rn(p0, p1);  // one F2FP for both halves
                if constexpr (kTransposeInRegisters)
                    bp[mt][r] = movmatrix_trans(*reinterpret_cast<const uint32_t*>(&h));
                else
                    *reinterpret_cast<__half2*>(prow + (16 * mt + 8 * r) * 16) = h;
            }
        }
        if constexpr (!kTransposeInRegisters) {
            __syncwarp();
            uint32_t r4[4];
            ldmatrix_x4<true>(r4, pbuf + lane * 16);
            bp[0][0] = r4[0], bp[0][1] = r4[1], bp[1][0] = r4[2], bp[1][1] = r4[3];
            ldmatrix_x4<true>(r4, pbuf + (32 + lane) * 16);
            bp[2][0] = r4[0], bp[2][1] = r4[1], bp[3][0] = r4[2], bp[3][1] = r4[3];
        }

        // O^T += V^T P'^T over the page's four 16-token blocks (decode_values.cuh).
        const uint8_t* vcodes = buf + L.value_codes_offset + g * kValueChunk;
        [[maybe_unused]] uint32_t value_regs[2][4];
        if constexpr (kValueMatrices) {
            static_assert(kValueTok == 16 && kPage == 64, "a token's value codes are one row");
            ldmatrix_x4_at<true>(value_regs[0], value_rows + 2 * slot * kPageCodes);
            ldmatrix_x4_at<true>(value_regs[1],
                                 value_rows + 2 * slot * kPageCodes + mixed_delta(512));
        }
        page_values<D, VBITS, MIXED, kDimPairs, kValueMatrices, kV64, kMixedTable, kValueShift,
                    kValueByteCopies>(
            o, bp,
            [&](int kb) {  // this thread's chunk of token t of block kb
                return MIXED
                           ? mixed_values + 2 * slot * kPageCodes + mixed_delta(16 * kb * kValueTok)
                           : vcodes + (16 * kb + t) * L.value_code_bytes;
            },
            L.value_code_bytes, value_regs, pair_sel, v64_lane, value_table, lane4, lane8);
        __syncwarp();
        issue(i + S, halves ? 1 : 2, slot);  // into the slot just read
    };
    // Centred keys: the page bias comes from the kernel this decode may be the programmatic
    // dependent of (launch_decode_attention); the set-up above overlapped it.
    if (a.page_bias != nullptr) wait_for_prerequisite_grid();
    if constexpr (MIXED && kMixedRing == 2) {
        int i = 0;
        for (; i + 1 < count; i += 2) {
            page_step(i, std::integral_constant<int, 0>{});
            page_step(i + 1, std::integral_constant<int, 1>{});
        }
        if (i < count) page_step(i, std::integral_constant<int, 0>{});
    } else {
        for (int i = 0, slot = 0; i < count; ++i, slot = slot + 1 == S ? 0 : slot + 1)
            page_step(i, MIXED ? 0 : slot);
    }
    cp_async_wait(0);

    // This split's partial state ([batch][kv head][split]), from the warps' states merged in
    // shared memory over the rings.
    float* states = reinterpret_cast<float*>(MIXED ? mixed : rings);
    const size_t partial = static_cast<size_t>(unit) * kp.split.splits + split;
    if constexpr (kDimPairs) {
        // (write_split_state's order: element 2 r + c of a tile is dimension 4 m + r + 2 c, where
        // 4-bit values hold 4 m + 2 r + c)
        float o2[D / 32][4];
#pragma unroll
        for (int m = 0; m < D / 32; ++m)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int e = VBITS == 4 && (c == 1 || c == 2) ? 3 - c : c;
                o2[m][c] = o[m][e] + o[m + D / 32][e];
            }
        write_split_state<D, HILO, WARPS>(states, o2, m_run, l_run, heads, G, T.value_pair_scale,
                                          kp, partial, warp, g, t);
    } else {
        write_split_state<D, HILO, WARPS>(states, o, m_run, l_run, heads, G, T.value_pair_scale, kp,
                                          partial, warp, g, t);
    }
}

}  // namespace veloxquant::cuda::kernels
