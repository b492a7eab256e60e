// Thin launchers of the turboquant decode: argument checks, kernel selection by (head_dim, key
// bits, value bits), the split-K plan, and the launches of the decode and its merge.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/decode_split.h"
#include "cuda/programmatic_launch.h"
#include "cuda/runtime_facts.h"
#include "cuda/turboquant_decode.cuh"

namespace veloxquant::cuda {

bool layout_supported(const TqPageLayout& L) {
    const bool values =
        L.value_bits == 1 || L.value_bits == 2 || L.value_bits == 4 || L.value_bits == 16;
    return (L.head_dim == 64 || L.head_dim == 128) && L.key_bits >= 1 && L.key_bits <= 4 &&
           L.key_stages >= 1 && L.key_stages <= kernels::kMaxStages && values &&
           L.num_kv_heads >= 1 && L.head_bytes % 64 == 0 && L.value_codes_offset % 16 == 0 &&
           L.page_bytes == static_cast<uint64_t>(L.num_kv_heads) * L.head_bytes;
}

namespace {

using kernels::DecodeKernelParams;
using kernels::kDecodeWarps;
using kernels::kMaxGroup;

struct DecodeKernel {
    void (*fn)(DecodeKernelParams) = nullptr;
    size_t shared_bytes = 0;  // sizeof(DecodeShared), before the table copies and the rings
    int lutc = 1;             // lane copies of the 256-entry pair tables (4-bit keys or values)
    int vc = 0;               // copies of the byte-indexed 2-bit value table (0: none)
    bool mixed = false;       // the mixed-row layout (decode_mixed_bytes)
    // Share of each sequence's pages the long-context plan leaves to tail splits, and whether
    // their pieces scale with the head splits (decode_split.h)
    double tail_share = 0.10;
    bool scaled_tails = false;
    int warps = kDecodeWarps;  // per CTA
};

// `lutc`: lane copies (1, 16, 32) of the 256-entry tables of 4-bit keys or values; ignored
// otherwise. 2-bit values always take the byte-indexed table (16 copies). `mixed`: the mixed-row
// layout of the 4-bit value table (32 copies), shared by 4-bit keys or beside 2-bit keys, or of
// the 2-bit value table beside 1-bit keys.
template <int D, int K, int V, bool HILO>
DecodeKernel decode_entry(int lutc, bool mixed) {
    using kernels::decode_attention_kernel;
    using kernels::DecodeShared;
    constexpr int VC = V == 2 ? 16 : 0;
    if constexpr ((K == 4 || K == 2) && V == 4) {
        if (mixed) {
            // Two 2-bit key stages at head_dim 64: eight warps a CTA, 16 a SM instead of 12
            constexpr int W = K == 2 && D == 64 ? 8 : kDecodeWarps;
            DecodeKernel k{&decode_attention_kernel<D, K, V, HILO, 32, VC, true, W>,
                           sizeof(DecodeShared<D, K, V, 32, W>), 32, VC, true};
            k.warps = W;
            return k;
        }
    }
    if constexpr (K == 1 && V == 2) {
        if (mixed) {
            // At head_dim 64 eight warps a CTA: two CTAs per SM hold 16 warps instead of 12
            constexpr int W = D == 64 ? 8 : kDecodeWarps;
            DecodeKernel k{&decode_attention_kernel<D, K, V, HILO, 1, VC, true, W>,
                           sizeof(DecodeShared<D, K, V, 1, W>), 1, VC, true};
            k.tail_share = 1.0 / 16;  // its best measured (1/10, as at 4-bit values: 1.8% slower)
            k.scaled_tails = D == 64 && HILO;  // timed at groups of up to 4 only
            k.warps = W;
            return k;
        }
    }
    if constexpr (K == 4 || V == 4) {
        if (lutc == 32)
            return {&decode_attention_kernel<D, K, V, HILO, 32, VC>,
                    sizeof(DecodeShared<D, K, V, 32>), 32, VC};
        if (lutc == 16)
            return {&decode_attention_kernel<D, K, V, HILO, 16, VC>,
                    sizeof(DecodeShared<D, K, V, 16>), 16, VC};
    }
    return {&decode_attention_kernel<D, K, V, HILO, 1, VC>, sizeof(DecodeShared<D, K, V>), 1, VC};
}

template <int D, int K, bool HILO>
DecodeKernel pick_value_bits(int value_bits, int lutc, bool mixed) {
    switch (value_bits) {
        case 1:
            return decode_entry<D, K, 1, HILO>(lutc, mixed);
        case 2:
            return decode_entry<D, K, 2, HILO>(lutc, mixed);
        case 4:
            return decode_entry<D, K, 4, HILO>(lutc, mixed);
        case 16:
            return decode_entry<D, K, 16, HILO>(lutc, mixed);
        default:
            return {};
    }
}

template <int D, bool HILO>
DecodeKernel pick_key_bits(int key_bits, int value_bits, int lutc, bool mixed) {
    switch (key_bits) {
        case 1:
            return pick_value_bits<D, 1, HILO>(value_bits, lutc, mixed);
        case 2:
            return pick_value_bits<D, 2, HILO>(value_bits, lutc, mixed);
        case 3:
            return pick_value_bits<D, 3, HILO>(value_bits, lutc, mixed);
        case 4:
            return pick_value_bits<D, 4, HILO>(value_bits, lutc, mixed);
        default:
            return {};
    }
}

// Groups of up to 4 query heads split each query into fp16 hi + lo columns.
DecodeKernel pick_decode(const TqPageLayout& L, int group, int lutc, bool mixed = false) {
    const bool hilo = group <= 4;
    if (L.head_dim == 64)
        return hilo ? pick_key_bits<64, true>(L.key_bits, L.value_bits, lutc, mixed)
                    : pick_key_bits<64, false>(L.key_bits, L.value_bits, lutc, mixed);
    if (L.head_dim == 128)
        return hilo ? pick_key_bits<128, true>(L.key_bits, L.value_bits, lutc, mixed)
                    : pick_key_bits<128, false>(L.key_bits, L.value_bits, lutc, mixed);
    return {};
}

// 4-bit keys and values of one codebook: the values read the key table's lane copies, which
// halves the tables' shared memory (3 CTAs per SM instead of 2 at head_dim 128 with 32 copies).
bool shared_pairs(const DecodeArgs& a) {
    const TqPageLayout& L = a.layout;
    return L.key_bits == 4 && L.value_bits == 4 && a.tables.key_pairs != nullptr &&
           a.tables.value_pairs == a.tables.key_pairs;
}

// Pages per warp of the mixed rows for this layout (decode_mixed_ring).
int mixed_ring(const TqPageLayout& L) {
    return kernels::decode_mixed_ring(
        static_cast<int>(kernels::kPage * (L.key_code_bytes + L.value_code_bytes)), L.value_bits);
}

// The mixed-row layout, for a page whose key and value code blocks are packed tokens (D / 2 bytes
// each at 4-bit values; D / 8 and D / 4 at 1-bit keys and 2-bit values) whose blocks lie at the
// offsets PageLayout::finalize gives them (mixed_slice_offsets: the kernel takes them as
// constants) and whose page stride fits 32 bits: at 4-bit values (one page per warp) the keys are
// one 4-bit stage of the values' codebook (one table in the rows) or two 2-bit stages (integer
// scores, no table: one block of four query heads for groups of up to 4, two for 5..8); at 2-bit
// values one 1-bit key stage (two pages per warp). Any other layout takes the general
// kernels. args.table_copies and another args.ring force the other layouts. sm_90 only, whose
// dynamic shared memory starts at kDynamicSharedBase of the window (the kernel traps otherwise).
bool mixed_rows(const DecodeArgs& a, int major) {
    const TqPageLayout& L = a.layout;
    const uint32_t d = static_cast<uint32_t>(L.head_dim);
    const bool four = ((shared_pairs(a) && L.key_stages == 1) ||
                       (L.key_bits == 2 && L.key_stages == 2 && L.value_bits == 4)) &&
                      L.key_code_bytes == d / 2 && L.value_code_bytes == d / 2;
    const bool one_two = L.key_bits == 1 && L.key_stages == 1 && L.value_bits == 2 &&
                         L.key_code_bytes == d / 8 && L.value_code_bytes == d / 4;
    const kernels::MixedSliceOffsets slice =
        kernels::mixed_slice_offsets(L.key_code_bytes, L.value_code_bytes);
    // (A sliding window's CTAs map their pages past the sink pages, which the mixed rows' page
    // walk does not: windows take the general kernels.)
    return major == 9 && (four || one_two) && a.table_copies == 0 && a.window.window == 0 &&
           a.page_tables == nullptr && (a.ring == 0 || a.ring == mixed_ring(L)) &&
           L.key_norms_offset == slice.norms && L.value_codes_offset == slice.values &&
           L.value_scales_offset == slice.scales && L.head_bytes == slice.head_bytes &&
           L.page_bytes <= UINT32_MAX;
}

// A kernel's shared-memory plan: ring depth, bytes and CTAs per SM.
struct Residency {
    int ring = 1;
    size_t smem = 0;
    int per_sm = 0;
};

cudaError_t plan_residency(const DecodeArgs& a, const DecodeKernel& k, Residency& r) {
    // Ring depth: the most pages per warp (2..4) that keep the CTA within the largest residency
    // tier that holds two (4, 3, 2 or 1 CTAs per SM: 228 KB less 1 KB per CTA), else one. When
    // that leaves at most two CTAs per SM and one page per warp fits more, one page per warp:
    // more warps hide the latency better than a deeper ring (measured on 4-bit keys and values,
    // head_dim 128). Taking one page whenever it fits more CTAs lost at 1-bit keys / 2-bit
    // values (3 -> 4 CTAs per SM: 0.218 -> 0.221 ms at B=8, 0.055 -> 0.060 ms at B=1, N=128K;
    // bench/cuda/decode_tuning.md). args.ring forces a depth.
    const TqPageLayout& L = a.layout;
    constexpr size_t kTiers[] = {56 * 1024, 75 * 1024, 113 * 1024, 227 * 1024};
    constexpr size_t kSmemMax = 227 * 1024;
    const size_t fixed = kernels::decode_ring_offset(
        kernels::decode_ring_offset(k.shared_bytes) +
        kernels::decode_lut_bytes(L.key_bits, L.key_stages, L.value_bits, k.lutc, shared_pairs(a)) +
        kernels::decode_v64_bytes(L.value_bits, k.vc));
    const size_t states = kernels::decode_states_bytes(L.head_dim, a.group, k.warps);
    if (k.mixed) {  // the page rings and the final states lie in the mixed rows
        r.ring = mixed_ring(L);
        r.smem = kernels::decode_ring_offset(k.shared_bytes) +
                 kernels::decode_mixed_bytes(r.ring, k.warps);
        return resident_ctas(k.fn, 32 * k.warps, r.smem, r.per_sm);
    }
    const size_t page_set = static_cast<size_t>(k.warps) * L.head_bytes;  // one page per warp
    int ring = 1;
    for (const size_t tier : kTiers) {
        if (fixed + std::max(2 * page_set, states) <= tier) {
            ring = static_cast<int>(
                std::min<size_t>((tier - fixed) / page_set, kernels::kMaxDecodeRing));
            break;
        }
    }
    if (a.ring != 0) ring = a.ring;
    auto smem = [&](int depth) { return fixed + std::max(depth * page_set, states); };
    if (smem(ring) > kSmemMax) return cudaErrorInvalidValue;
    auto occupancy = [&](int depth, int& per_sm) {
        return resident_ctas(k.fn, 32 * k.warps, smem(depth), per_sm);
    };
    r.ring = ring;
    r.smem = smem(ring);
    cudaError_t err = occupancy(ring, r.per_sm);
    if (err == cudaSuccess && ring > 1 && r.per_sm <= 2 && a.ring == 0) {
        int one = 0;
        err = occupancy(1, one);
        if (err == cudaSuccess && one > r.per_sm) r.ring = 1, r.smem = smem(1), r.per_sm = one;
    }
    return err;
}

// Lane copies of 4-bit tables (args.table_copies, or the plan's choice). Their lookups through
// shared memory bound the page loop, so the plan takes conflict-free tables (32 copies) at
// head_dim 128 or with one table shared by keys and values, and 16 copies (at most 2-way
// conflicts) for two tables at 64, where lookups are half of a page's work and the extra CTA per
// SM of smaller tables pays more; either only while two CTAs still fit per SM, else the most
// copies that keep the residency of plain tables (H200 measurements in
// bench/cuda/decode_tuning.md).
cudaError_t pick_kernel(const DecodeArgs& a, int major, DecodeKernel& k, Residency& r) {
    const TqPageLayout& L = a.layout;
    const bool four = L.key_bits == 4 || L.value_bits == 4;
    if (mixed_rows(a, major)) {
        k = pick_decode(L, a.group, 32, true);
        return plan_residency(a, k, r);
    }
    if (a.table_copies != 0 || !four) {
        k = pick_decode(L, a.group, four ? a.table_copies : 1);
        return plan_residency(a, k, r);
    }
    const DecodeKernel plain = pick_decode(L, a.group, 1);
    Residency rp;
    cudaError_t err = plan_residency(a, plain, rp);
    if (err != cudaSuccess) return err;
    k = plain, r = rp;
    const int preferred = L.head_dim == 128 || shared_pairs(a) ? 32 : 16;
    for (const int c : {preferred, preferred == 32 ? 16 : 32}) {
        const DecodeKernel cand = pick_decode(L, a.group, c);
        Residency rc;
        if (plan_residency(a, cand, rc) != cudaSuccess) continue;
        if (rc.per_sm >= 2 || rc.per_sm >= rp.per_sm) {
            k = cand, r = rc;
            break;
        }
    }
    return cudaSuccess;
}

struct DecodePlan {
    DecodeKernel kernel;
    int ring = 1;
    size_t smem = 0;
    DecodeSplit split;
    uint64_t page_policy = 0;  // L2 policy word of the mixed-row kernels' page copies
    size_t partial_o_bytes = 0;
    size_t partial_ml_bytes = 0;
};

size_t align256(size_t n) {
    return (n + 255) / 256 * 256;
}

// Whether every table the decode reads for this layout is there (a null one would fault in the
// kernel): rotations, stage weights, the key pair tables (2-4 bits), 2-bit keys' integer parts,
// the value pair table; and a positive, finite value table scale, whose log2 the softmax adds
// (0 would turn every output into NaN instead of zeros).
bool tables_present(const TqPageLayout& L, const TqDeviceTables& T) {
    return T.key_signs != nullptr && T.value_signs != nullptr && T.key_affine != nullptr &&
           (L.key_bits == 1 || T.key_pairs != nullptr) &&
           (L.key_bits != 2 || (T.key_i8 != nullptr && T.key_i8_joint != nullptr)) &&
           (L.value_bits == 16 || T.value_pairs != nullptr) && std::isfinite(T.value_pair_scale) &&
           T.value_pair_scale > 0.0f;
}

// Split-K plan: kernel (table copies), ring depth, and the split of each sequence's pages.
cudaError_t make_decode_plan(const DecodeArgs& a, DecodePlan& plan) {
    const TqPageLayout& L = a.layout;
    if (!layout_supported(L) || !tables_present(L, a.tables) || a.group < 1 ||
        a.group > kMaxGroup || a.batch < 1 || a.max_seq_len < 1 ||
        (a.pool == nullptr && a.pools == nullptr) ||
        (a.page_table == nullptr && a.page_tables == nullptr) || a.queries == nullptr ||
        a.out == nullptr ||
        (a.page_tables == nullptr &&
         a.page_table_stride < (a.max_seq_len + kernels::kPage - 1) / kernels::kPage) ||
        a.window.window < 0 || a.window.sinks < 0 ||
        (a.window.window > 0 && a.page_bias != nullptr) ||
        (a.seq_lens == nullptr && (a.seq_len < 0 || a.seq_len > a.max_seq_len)) ||
        (a.table_copies != 0 && a.table_copies != 1 && a.table_copies != 16 &&
         a.table_copies != 32) ||
        a.ring < 0 || a.ring > kernels::kMaxDecodeRing || a.page_eviction < 0 ||
        a.page_eviction > 2)
        return cudaErrorInvalidValue;
    int sms = 0, major = 0;
    cudaError_t err = device_facts(sms, major);
    if (err != cudaSuccess) return err;
    if (major < 8) return cudaErrorNotSupported;  // mma.sync m16n8k16 / m16n8k32 and cp.async
    Residency r;
    if ((err = pick_kernel(a, major, plan.kernel, r)) != cudaSuccess) return err;
    plan.ring = r.ring;
    plan.smem = r.smem;
    DecodeSplitInputs in;
    // A window's CTAs walk at most its span (the sink pages, the window and the page it starts in).
    in.pages = (a.window.span_bound(1, a.max_seq_len) + kernels::kPage - 1) / kernels::kPage;
    in.units = static_cast<long long>(a.batch) * L.num_kv_heads;
    in.sms = sms;
    in.per_sm = std::max(r.per_sm, 1);
    in.tail_share = plan.kernel.tail_share;
    in.scaled_tails = plan.kernel.scaled_tails;
    in.splits = a.splits, in.split_pages = a.split_pages, in.tail_pages = a.tail_pages;
    if (!plan_decode_split(in, plan.split)) return cudaErrorInvalidValue;
    // The pages are read once a decode, and a model streams its weights through the L2 between
    // two decodes of a layer: fetched evict-first, they stop pushing out what the decode reads
    // again (page tables, queries, the partials the merge reads). (H200, 1-bit keys / 2-bit
    // values, d = 64: 0.0860-0.0864 -> 0.0853-0.0855 ms at B = 8, N = 128K; bench/results/
    // cuda_h200_20261204zn_page_eviction.txt.) page_eviction forces either policy.
    plan.page_policy = a.page_eviction == 1 ? kL2EvictNormal : kL2EvictFirst;
    const size_t partials = static_cast<size_t>(in.units) * plan.split.splits * a.group;
    plan.partial_o_bytes = align256(partials * L.head_dim * sizeof(float));
    plan.partial_ml_bytes = align256(partials * sizeof(float2));
    return cudaSuccess;
}

}  // namespace

std::size_t decode_workspace_bytes(const DecodeArgs& a) {
    DecodePlan plan;
    if (make_decode_plan(a, plan) != cudaSuccess) return 0;
    return plan.partial_o_bytes + plan.partial_ml_bytes;
}

bool decode_takes_mixed_rows(const DecodeArgs& a, int major) {
    return mixed_rows(a, major);
}

int decode_splits(const DecodeArgs& a) {
    DecodePlan plan;
    return make_decode_plan(a, plan) == cudaSuccess ? plan.split.splits : 0;
}

cudaError_t launch_decode_attention(const DecodeArgs& a, cudaStream_t stream) {
    DecodePlan plan;
    cudaError_t err = make_decode_plan(a, plan);
    if (err != cudaSuccess) return err;
    if (a.workspace == nullptr) return cudaErrorInvalidValue;
    DecodeKernelParams kp;
    kp.args = a;
    kp.split = plan.split;
    kp.ring = plan.ring;
    kp.page_policy = plan.page_policy;
    kp.shared_pairs = shared_pairs(a);
    kp.partial_o = static_cast<float*>(a.workspace);
    kp.partial_ml =
        reinterpret_cast<float2*>(static_cast<uint8_t*>(a.workspace) + plan.partial_o_bytes);
    const dim3 grid(plan.split.splits * a.batch * a.layout.num_kv_heads);  // split-major
    // Centred keys: a programmatic dependent of the page-bias kernel (KeyCenter::page_bias), so
    // that the decode's set-up overlaps it; the decode waits for it before its first page.
    bool after_bias = false;
    if (a.page_bias != nullptr &&
        (err = waits_for_prerequisite(plan.kernel.fn, after_bias)) != cudaSuccess)
        return err;
    if ((err = launch_after_prerequisite(plan.kernel.fn, grid, dim3(plan.kernel.warps * 32),
                                         plan.smem, stream, after_bias, kp)) != cudaSuccess)
        return err;
    // The merge: one CTA per (sequence, query head), a warp per split up to kMergeWarps.
    const unsigned rows = static_cast<unsigned>(a.batch * a.layout.num_kv_heads * a.group);
    // Where the merge's code is built for sm_90 or newer, a programmatic dependent launch: the
    // merge grid launches once every decode CTA has started (the decode allows it at its entry),
    // its CTAs take the SMs that the decode leaves and wait (griddepcontrol.wait) for its writes.
    // (H200: 0.0368 -> 0.0364 ms at B = 1, N = 128K, launched as the decode's CTAs ended; then
    // 0.0111 -> 0.0107 at B = 1, N = 8K, launched early: cuda_h200_20261204zi_merge_trigger_ab.)
    auto merge = a.layout.head_dim == 64 ? kernels::merge_kernel<64> : kernels::merge_kernel<128>;
    bool waits = false;
    if ((err = waits_for_prerequisite(merge, waits)) != cudaSuccess) return err;
    return launch_after_prerequisite(
        merge, dim3(rows), dim3(32 * std::clamp(plan.split.splits, 1, kernels::kMergeWarps)), 0,
        stream, waits, kp);
}

}  // namespace veloxquant::cuda
