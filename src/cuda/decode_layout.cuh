// Shared-memory layout of the split-K decode kernel (turboquant_decode.cuh), which its launcher's
// plan (turboquant_launch.cu) sizes: the fixed block, the lane copies of the lookup tables, the
// per-warp page rings and the warps' final states over them, and the mixed rows of one 4-bit
// table with the rings.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/turboquant_kernels.cuh"

namespace veloxquant::cuda::kernels {

template <int D, int KBITS, int VBITS, int LUTC = 1, int WARPS = kDecodeWarps>
struct DecodeShared {
    // (tables with lane copies live after this struct instead)
    static constexpr int kKeyPairs = KBITS == 1 || (LUTC > 1 && KBITS == 4) ? 1 : 1 << (2 * KBITS);
    static constexpr int kValuePairs =
        VBITS == 16 || (LUTC > 1 && VBITS == 4) ? 1 : 1 << (2 * VBITS);
    union {                     // the queries are read once, before the page loop
        float q[kMaxGroup][D];  // rotated, power-of-two scaled queries
        uint4 p[WARPS][kPage];  // P'^T rows (4-bit keys and values): 8 halves per token
    };
    float head_mul[kMaxGroup];        // undoes that scale
    float head_add[kMaxGroup];        // C0 sum * sum_j q'_j (1-bit keys)
    float key_affine[kMaxStages][2];  // per stage: (C0, C1 - C0) or (0, pair table scale)
    uint32_t key_pairs[kMaxStages][kKeyPairs];
    uint32_t key_i8[kMaxStages][2];  // 2-bit keys: the centroids' high and low bytes (key_i8)
    uint32_t value_pairs[kValuePairs];
};

/// Pages in a warp's ring in the general layout (the plan's and args.ring's limit).
constexpr int kMaxDecodeRing = 4;

/// The warps' final states, written over the rings: [warp][head][D] outputs, then the running
/// max and sum of each (warp, head).
__host__ __device__ constexpr size_t decode_states_bytes(int head_dim, int group, int warps) {
    return static_cast<size_t>(warps) * group * (head_dim + 2) * sizeof(float);
}

/// A shared-memory region's end rounded up to 128 bytes. After DecodeShared come the table
/// copies, then the cp.async rings (reused for the warps' final states).
__host__ __device__ constexpr size_t decode_ring_offset(size_t shared_bytes) {
    return (shared_bytes + 127) / 128 * 128;
}

/// Lane copies of the 256-entry pair tables (4-bit keys or values): with LUTC copies, entry i of
/// copy c is word i * LUTC + c and lane l reads copy l % LUTC, so LUTC = 32 makes every lookup
/// conflict-free (one bank per lane) and LUTC = 16 at most 2-way; 1 is the plain table in
/// DecodeShared. Bytes of those copies after DecodeShared (before the rings); with
/// `shared_pairs` the values read the first key stage's copies (the same codebook).
__host__ __device__ constexpr size_t decode_lut_bytes(int key_bits, int key_stages, int value_bits,
                                                      int lutc, bool shared_pairs) {
    return lutc == 1 ? 0
                     : static_cast<size_t>((key_bits == 4 ? key_stages : 0) +
                                           (value_bits == 4 && !shared_pairs ? 1 : 0)) *
                           256 * lutc * sizeof(uint32_t);
}

/// 2-bit values, byte-indexed: entry e (token A's dims 2v, 2v + 1 in bits 0-3, token B's in bits
/// 4-7) holds both A fragments of a tile, (half2 of dim 2v, half2 of dim 2v + 1), one LDS.64;
/// VC lane copies (entry e of copy c at uint2 VC e + c): 16 keep each half-warp conflict-free
/// (8 were slower: 2-way conflicts; the nibble-indexed pair table, value_pair, costs 3
/// instructions per fragment register instead of 1.5).
__host__ __device__ constexpr size_t decode_v64_bytes(int value_bits, int vc) {
    return value_bits == 2 ? static_cast<size_t>(256) * vc * sizeof(uint2) : 0;
}

/// The low 16 bits of the shared-window address of a kernel's dynamic shared memory when it has
/// no static shared memory: sm_90 reserves the first 1 KB of each CTA's window. Mixed-row
/// lookups put it in the load's immediate, with the window's upper bits in the lane register;
/// the kernel traps if its window differs, and the plan takes mixed rows only on sm_90.
constexpr uint32_t kDynamicSharedBase = 0x400;

/// Mixed rows: a 64 KB region of 256 rows of 256 bytes, where row i holds the lane copies of
/// entry i of one table in bytes 0-127 (the 4-bit pair table's 32 copies of 4 bytes, read by
/// row_lut; or the byte-indexed 2-bit value table's 16 copies of 8 bytes, read by row_lut64: one
/// PRMT and one LDS per lookup) and 128 bytes of the warps' code rings in bytes 128-255 (warp w's
/// ring, pages of keys then values, in its own run of rows). The norms and scales go to
/// [2][warp][ring][kPage] floats after the region (each slot's transposed where the kernel says
/// so).
__host__ __device__ constexpr size_t decode_mixed_bytes(int ring, int warps) {
    return 256 * 256 + static_cast<size_t>(2) * warps * ring * kPage * sizeof(float);
}

/// Pages per warp in the mixed rows, for a page of `page_code_bytes` key and value code bytes: one
/// at 4-bit values (refilled in halves, as tuned there), else two, which keep three CTAs per SM
/// (the region is 64 of the 75 KB a CTA may take for that) and fit a warp's 64 rows at 2-bit
/// values with 1-bit keys.
__host__ __device__ constexpr int decode_mixed_ring(int page_code_bytes, int value_bits) {
    return value_bits == 4 || 2 * page_code_bytes > 64 * 128 ? 1 : 2;
}

/// Byte offsets within one KV head's slice of a page (TqPageLayout, PageLayout::finalize: each
/// block 64-byte aligned) for `key_token_bytes` and `value_token_bytes` of codes per token: the
/// mixed-row kernels take them as constants (the launcher checks the layout against them).
struct MixedSliceOffsets {
    uint32_t norms, values, scales, head_bytes;
};
__host__ __device__ constexpr uint32_t align64(uint32_t n) {
    return (n + 63) / 64 * 64;
}
__host__ __device__ constexpr MixedSliceOffsets mixed_slice_offsets(uint32_t key_token_bytes,
                                                                    uint32_t value_token_bytes) {
    const uint32_t norms = align64(kPage * key_token_bytes);
    const uint32_t values = align64(norms + kPage * sizeof(float));
    const uint32_t scales = align64(values + kPage * value_token_bytes);
    return {norms, values, scales, align64(scales + kPage * sizeof(float))};
}

/// The address step of ring offset d (bytes) in the mixed rows: whole 128-byte row halves double,
/// the rest adds as is, which is exact when the lane's base offset plus d % 128 stays within its
/// row half (every chunk the kernel reads does: its static_asserts).
__host__ __device__ constexpr uint32_t mixed_delta(uint32_t d) {
    return d + (d & ~127u);
}

}  // namespace veloxquant::cuda::kernels
