// Device helpers of the decode kernel (turboquant_decode.cuh) that turn the queries and the
// packed key and value codes into mma fragments: the queries' fp16 and int8 fragments, chunk
// loads, bit-field extraction, table lookups, exact 1-bit decodes, and the pairing of two tokens'
// value codes.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/turboquant_kernels.cuh"

namespace veloxquant::cuda::kernels {

// mma m16n8k16 fragments (g = lane / 4, t = lane % 4): A rows g and g + 8, k = 2t, 2t + 1 (a0,
// a1) and 2t + 8, 2t + 9 (a2, a3); B k = 2t, 2t + 1 and 2t + 8, 2t + 9 at column g; C rows g and
// g + 8 at columns 2t, 2t + 1. The contraction order is free, so each operand is laid out where
// its packed bits are cheapest to read:
//   scores  A = keys: row = token, thread t owns coordinates [t D/4, (t + 1) D/4) of the token,
//           one contiguous chunk of each stage's code. 1-bit keys score in integers (mma
//           m16n8k32, key bytes 0/1 or 0/-1 against the query as int8 hi and lo columns; score
//           = C0 sum q' + (C1 - C0) sum q'_j b_j), 2-bit keys in groups of up to 4 too: the
//           centroids as 16-bit fixed point K = 256 high + low (key_i8), each part's byte picked
//           by one PRMT whose selector nibbles are four codes, two mma m16n8k32 (s8 x s8) per
//           block. The integer query columns are 2h (hi) and 2h + 1 (lo) of head h, heads 0..3
//           in one n8 block and, for groups of 5..8, heads 4..7 in a second. Wider keys and 2-bit
//           keys in groups of 5..8 score in fp16: a 2b-bit pair field indexes a half2 table of
//           (C[i0], C[i1]) / max|C| (lane copies for 4 bits, decode_lut_bytes), against
//           B = rotated queries: column 2h = fp16(q'_h), 2h + 1 = fp16(q'_h - hi) for G <= 4
//           (so the hi + lo add stays in one thread), column h = fp16(q'_h) for G = 5..8.
//   values  A = V^T: row = dimension, k = token; lane group g owns dimensions [g D/8, (g+1) D/8),
//           a contiguous chunk of each token's code; row g of tile v is dimension gD/8 + 2v, row
//           g + 8 is gD/8 + 2v + 1. Two tokens' chunks merge into 2b-bit pair fields (token A's
//           index, token B's index) that index a half2 table; 2-bit values instead take one
//           byte per (token pair, dimension pair) that indexes both registers of a tile at once
//           (decode_v64_bytes); fp16 values are a byte permute.
//           B = P'^T (p times the value scale): the score C fragments, transposed
//           in registers by movmatrix, or, at 4-bit keys and values, whose table lookups keep
//           the shared-memory pipe busier, through shared memory (STS, ldmatrix.trans: 2.7% faster
//           there, 3.5% slower at 1-bit keys and 2-bit values). Within each 16-token block, k
//           position 2t + i (i = 0, 1) and 2t + 8 + i hold tokens t + 4i and t + 8 + 4i, so that
//           the four lanes t of a lane group read four different banks; for that, score row g of a
//           tile is token 4 (g % 2) + g / 2 of it (row_token). P' is fp16, as in flash attention,
//           whose rounding (2^-12 relative) is far under the codes' error; at 4-bit keys and
//           values, bound by shared memory, P' keeps its hi/lo split in the spare columns
//           (dropping it there measured 1% slower; elsewhere it saves 1.4-2.8%).

/// Loads `BYTES` bytes at p (aligned to the lowest set bit of BYTES, at most 16) into words.
template <int BYTES>
__device__ __forceinline__ void load_chunk(const uint8_t* p, uint32_t (&w)[(BYTES + 3) / 4]) {
    if constexpr (BYTES % 16 == 0) {
#pragma unroll
        for (int i = 0; i < BYTES / 16; ++i) {
            const uint4 v = reinterpret_cast<const uint4*>(p)[i];
            w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
        }
    } else if constexpr (BYTES % 8 == 0) {
#pragma unroll
        for (int i = 0; i < BYTES / 8; ++i) {
            const uint2 v = reinterpret_cast<const uint2*>(p)[i];
            w[2 * i] = v.x, w[2 * i + 1] = v.y;
        }
    } else if constexpr (BYTES % 4 == 0) {
#pragma unroll
        for (int i = 0; i < BYTES / 4; ++i) w[i] = reinterpret_cast<const uint32_t*>(p)[i];
    } else if constexpr (BYTES % 2 == 0) {
#pragma unroll
        for (int i = 0; i < (BYTES + 3) / 4; ++i) w[i] = 0;
#pragma unroll
        for (int i = 0; i < BYTES / 2; ++i)
            w[i / 2] |= static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i])
                        << (16 * (i & 1));
    } else {
        static_assert(BYTES == 1, "chunks are 1, 2, 4k or 2k + 2 bytes");
        w[0] = *p;
    }
}

/// Lane copies of a table in shared memory: entry e, copy c at dst[e * stride + c] (copies a power
/// of two, stride a multiple of 32 words). Each thread loads its entries once, so the CTA waits on
/// one round trip to the table instead of one per batch of copies, and writes their copies in an
/// order rotated by the lane, so that a warp's stores of 32 copies fall in 32 different banks.
template <int THREADS>
__device__ __forceinline__ void fill_lane_copies(uint32_t* dst, const uint32_t* src, int entries,
                                                 int copies, int stride) {
    constexpr int kPerThread = 6;  // up to 3 stages of 256 entries
    static_assert(THREADS * kPerThread >= 3 * 256, "entries per thread");
    uint32_t v[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
        const int e = threadIdx.x + j * THREADS;
        v[j] = e < entries ? src[e] : 0u;
    }
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
        const int e = threadIdx.x + j * THREADS;
        if (e < entries)
            for (int k = 0; k < copies; ++k)
                dst[e * stride + ((k + threadIdx.x) & (copies - 1))] = v[j];
    }
}

/// The byte-indexed 2-bit value table (decode_v64_bytes): 16 copies of each of its 256 entries,
/// entry e's copy c at entries[e * STRIDE + c], from `pair` = lane l's word of the 16-entry pair
/// table (l % 16). Entry e is (pair (e & 3) | (e >> 4 & 3) << 2, pair (e >> 2 & 3) | (e >> 6 & 3)
/// << 2). Thread i writes copy i % 16 of entries e0 + R k (e0 = i / 16 < R = THREADS / 16), whose
/// words are among 12 (R = 8) or 8 (R = 16) that as many shuffles fetch first: the writes then
/// need no shuffle each (a loop of two dependent shuffles per entry took ~3 us a CTA with three
/// CTAs per SM).
template <int THREADS, int STRIDE>
__device__ __forceinline__ void fill_value_byte_table(uint2* entries, uint32_t pair) {
    static_assert(THREADS == 128 || THREADS == 256, "8 or 16 entries of 16 copies a round");
    constexpr int R = THREADS / 16;
    const int e0 = threadIdx.x >> 4, c = threadIdx.x & 15;
    uint32_t first[4], second[2][4];
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        first[m] = __shfl_sync(kFull, pair, (e0 & 3) | m << 2);
        second[0][m] = __shfl_sync(kFull, pair, ((e0 >> 2) & 3) | m << 2);
        if constexpr (R == 8) second[1][m] = __shfl_sync(kFull, pair, ((e0 >> 2) + 2) | m << 2);
    }
#pragma unroll
    for (int k = 0; k < 256 / R; ++k) {
        // R = 8: e >> 2 & 3 = e0 / 4 + 2 (k & 1), e >> 4 & 3 = k / 2 & 3, e >> 6 = k / 8;
        // R = 16: e >> 2 & 3 = e0 / 4, e >> 4 & 3 = k & 3, e >> 6 = k / 4
        const uint2 entry = R == 8 ? make_uint2(first[(k >> 1) & 3], second[k & 1][(k >> 3) & 3])
                                   : make_uint2(first[k & 3], second[0][(k >> 2) & 3]);
        entries[(e0 + R * k) * STRIDE + c] = entry;
    }
}

/// Byte j of w, zero-extended: one PRMT.
__device__ __forceinline__ uint32_t byte_of(uint32_t w, int j) {
    return __byte_perm(w, 0, 0x4440u | j);
}

/// Byte offset (index << SHIFT) of the `width`-bit field at bit `pos` of w; pos and width are
/// compile-time constants once the callers' loops are unrolled.
template <int SHIFT, int N>
__device__ __forceinline__ uint32_t field_offset(const uint32_t (&w)[N], int pos, int width) {
    const int i = pos >> 5, sh = pos & 31;
    if (width == 8 && sh % 8 == 0)  // a whole byte (4-bit pairs): PRMT, then one IMAD in lut
        return byte_of(w[i], sh >> 3) << SHIFT;
    const uint32_t bits = sh + width <= 32 ? w[i] >> sh : __funnelshift_r(w[i], w[i + 1], sh);
    return (bits & ((1u << width) - 1u)) << SHIFT;
}

/// A table entry read through a 32-bit shared-window address: with a PRMT-extracted index, base
/// + (index << SHIFT) is one IMAD. Through a C++ pointer, ptxas rebuilt a word index (shift, mask
/// with the lane's copy) and added the window base in a third instruction (SASS of the 4-bit
/// decode: 4 instructions per lookup instead of 3).
__device__ __forceinline__ uint32_t lut(const uint32_t* table, uint32_t byte_offset) {
    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(table)) + byte_offset;
    uint32_t v;
    asm("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr));
    return v;
}

/// Mixed-row table (decode_mixed_bytes): entry i of the lane's copy lies at shared-window address
/// lane4 + (i << 8) + TABLE, where lane4 holds the window's upper 16 bits and 4 * lane and TABLE
/// is the region's offset in the window. One PRMT puts byte j of the code word into byte 1 of
/// lane4 and the load takes TABLE as its immediate: 2 instructions per lookup (through a register
/// base, ptxas added it with an IADD for each lookup).
template <uint32_t TABLE>
__device__ __forceinline__ uint32_t row_lut(uint32_t word, int j, uint32_t lane4) {
    const uint32_t offset = __byte_perm(word, lane4, 0x7604u | (j << 4));
    uint32_t v;
    asm("ld.shared.b32 %0, [%1+%2];\n" : "=r"(v) : "r"(offset), "n"(TABLE));
    return v;
}

/// row_lut for the byte-indexed 2-bit value table (decode_v64_bytes) in mixed rows: lane8 holds
/// the window's upper 16 bits and 8 * (lane % 16), the lane's copy; both A registers of a tile in
/// one LDS.64 (replacing an IMAD of the index with the copy stride).
template <uint32_t TABLE>
__device__ __forceinline__ uint2 row_lut64(uint32_t word, int j, uint32_t lane8) {
    const uint32_t offset = __byte_perm(word, lane8, 0x7604u | (j << 4));
    uint2 v;
    asm("ld.shared.v2.b32 {%0, %1}, [%2+%3];\n" : "=r"(v.x), "=r"(v.y) : "r"(offset), "n"(TABLE));
    return v;
}

/// B fragments of the fp16 score mma (m16n8k16) of thread t, from its column's rotated query row
/// q (a row of zeros for a column past the group): block kb, register r holds the query at the two
/// coordinates that the key fragment's register r pairs (two consecutive coordinates of the
/// chunk). The lo column (HILO) holds what fp16 leaves of each value.
template <int D, int BLOCKS>
__device__ __forceinline__ void query_fragments_f16(uint32_t (&bq)[BLOCKS][2], const float* q,
                                                    int t, bool lo_part) {
    constexpr int kCoords = D / 4;
#pragma unroll
    for (int kb = 0; kb < BLOCKS; ++kb) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int c0 = t * kCoords + 4 * kb + 2 * r;
            const float v0 = q[c0], v1 = q[c0 + 1];
            __half h0 = __float2half_rn(v0), h1 = __float2half_rn(v1);
            if (lo_part) {
                h0 = __float2half_rn(v0 - __half2float(h0));
                h1 = __float2half_rn(v1 - __half2float(h1));
            }
            bq[kb][r] = pack_half2(h0, h1);
        }
    }
}

/// B fragments of the integer score mma (m16n8k32, s8 query) of thread t: the query, scaled to
/// max |q'| in [128, 256), becomes Q = rint(127 q') = 256 hi + lo with hi, lo in int8 (columns
/// 2h, 2h + 1), exact to 2^-15 of max |q'|. Byte i of slot r of block kb is the coordinate whose
/// key byte the kernel puts there (s = 2 kb + r): 1-bit keys at D = 128, bit s + 8i of the lane's
/// 32-bit chunk: one shift by 2 kb and two masks (bit 0 and bit 1 of each byte) make slot 0's 0/1
/// and slot 1's 0/2 key bytes, so they take Q = rint(63.5 q') (2^-14 of max |q'|), 2 Q in slot 0;
/// 1-bit keys at D = 64, bit 4i + s of the lane's 16-bit chunk as a 0 or -1 byte (1 - bit in slot
/// 3: minus_key_bytes_d64), so they take -Q; 2-bit keys, coordinate 8 kb + r + 2i of the chunk,
/// whose code is nibble i of a PRMT selector.
template <int D, int KBITS, int BLOCKS>
__device__ __forceinline__ void query_fragments_i8(uint32_t (&bq8)[BLOCKS][2], const float* q,
                                                   int t, bool lo_part) {
    constexpr int kCoords = D / 4;
#pragma unroll
    for (int kb = 0; kb < BLOCKS; ++kb) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int s = 2 * kb + r;
            uint32_t word = 0;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int c = KBITS == 2 ? t * kCoords + 8 * kb + r + 2 * i
                              : D == 128 ? t * 32 + s + 8 * i
                                         : t * 16 + 4 * i + s;
                // 1-bit keys at D = 128: Q = rint(63.5 q'), and slot 0, whose key bytes are 0 or
                // 1 against slot 1's 0 or 2, takes 2 Q; at D = 64 -Q = -rint(127 q') against key
                // bytes of 0 or -1, or 1 - bit in slot 3 (each split as 256 hi + lo in int8).
                const int x = KBITS == 2 || D == 64
                                  ? (KBITS == 2 ? 1 : -1) * __float2int_rn(q[c] * 127.0f)
                              : r == 0 ? 2 * __float2int_rn(q[c] * 63.5f)
                                       : __float2int_rn(q[c] * 63.5f);
                const int hi = (x + 128) >> 8;
                const int v = lo_part ? x - 256 * hi : hi;
                word |= static_cast<uint32_t>(v & 0xFF) << (8 * i);
            }
            bq8[kb][r] = word;
        }
    }
}

/// Chunk type of one lane group's value dimensions (D / 8 of them) of one token.
template <int D, int VBITS>
using ValueChunk = std::conditional_t<(D / 8) * VBITS <= 32, uint32_t, uint64_t>;

template <int D, int VBITS>
__device__ __forceinline__ ValueChunk<D, VBITS> load_value_chunk(const uint8_t* p) {
    constexpr int kBytes = (D / 8) * VBITS / 8;
    if constexpr (kBytes == 1)
        return *p;
    else if constexpr (kBytes == 2)
        return *reinterpret_cast<const uint16_t*>(p);
    else if constexpr (kBytes == 4)
        return *reinterpret_cast<const uint32_t*>(p);
    else
        return *reinterpret_cast<const uint64_t*>(p);
}

/// (a & M) | (b & ~M) in one LOP3 (from the C form ptxas made a mask and a merge: 3
/// instructions for each pair word instead of 2 with the shift).
template <uint32_t M>
__device__ __forceinline__ uint32_t bit_select(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xE4;\n" : "=r"(d) : "r"(a), "r"(b), "n"(M));
    return d;
}

/// The mask of the low field of each pair of `vbits`-bit fields.
__host__ __device__ constexpr uint32_t low_fields(int vbits) {
    return vbits == 1 ? 0x55555555u : vbits == 2 ? 0x33333333u : 0x0F0F0F0Fu;
}

/// Pair fields of two tokens' chunks: field k of even() holds (A, B) indices of dimension 2k,
/// field k of odd() those of dimension 2k + 1, each 2 * VBITS bits wide. 64-bit chunks merge as
/// two 32-bit words (a shift and one LOP3 each): the bits a 64-bit shift carries across the words
/// are masked off anyway, which ptxas did not see (it spent 64-bit shifts and separate masks).
template <int VBITS, typename C>
__device__ __forceinline__ C merge_even(C a, C b) {
    if constexpr (sizeof(C) == 8) {
        return static_cast<C>(
                   merge_even<VBITS>(static_cast<uint32_t>(a), static_cast<uint32_t>(b))) |
               static_cast<C>(merge_even<VBITS>(static_cast<uint32_t>(a >> 32),
                                                static_cast<uint32_t>(b >> 32)))
                   << 32;
    } else {
        return bit_select<low_fields(VBITS)>(a, b << VBITS);
    }
}
template <int VBITS, typename C>
__device__ __forceinline__ C merge_odd(C a, C b) {
    if constexpr (sizeof(C) == 8) {
        return static_cast<C>(
                   merge_odd<VBITS>(static_cast<uint32_t>(a), static_cast<uint32_t>(b))) |
               static_cast<C>(
                   merge_odd<VBITS>(static_cast<uint32_t>(a >> 32), static_cast<uint32_t>(b >> 32)))
                   << 32;
    } else {
        return bit_select<low_fields(VBITS)>(a >> VBITS, b);
    }
}

/// 2-bit values at head_dim 64: from r = A | B << 16, two tokens' 16-bit chunks of 8 dimensions,
/// byte 0 / 1 holds A's and B's nibble 0 / 2 (merge_even), byte 2 / 3 their nibble 1 / 3
/// (merge_odd): A's nibble in the low half of each byte, B's in the high half.
__device__ __forceinline__ uint32_t pair_bytes(uint32_t r) {
    const uint32_t moved = bit_select<0x0000FFFFu>(r >> 12, r << 12);  // B's low / A's high
    return bit_select<0xF0F00F0Fu>(r, moved);
}

/// P'^T's B fragments where the value mma's A rows pair two dimensions of one token (the decode
/// kernel's kDimPairs: 2-bit values, or 4-bit values beside 2-bit keys, HILO). There k pair
/// (2t, 2t + 1) is (token, dimension a) and (token, dimension b), and column 2h + c (head h) sums
/// dimension a (c = 0) or b (c = 1), so it takes p in half c of the pair and zero in the other.
/// From x = (p of token t, p of token t + 4) of the thread's column (movmatrix of P' packed into
/// both halves), PRMT with these selectors makes the two k pairs' registers: .x for token t, .y
/// for token t + 4.
__device__ __forceinline__ uint2 dim_pair_selectors(int column) {
    return column & 1 ? make_uint2(0x1044u, 0x3244u) : make_uint2(0x4410u, 0x4432u);
}

/// The table entry of pair field `field` (a compile-time constant once unrolled); the shift
/// leaves the index already scaled to a byte offset (index << SHIFT).
template <int VBITS, int SHIFT, typename C>
__device__ __forceinline__ uint32_t value_pair(const uint32_t* table, C merged, int field) {
    constexpr int kWidth = 2 * VBITS;
    constexpr uint32_t kMask = ((1u << kWidth) - 1u) << SHIFT;
    const int sh = kWidth * field;
    if constexpr (kWidth == 8) {  // a whole byte (4-bit pairs): PRMT, then one IMAD in lut
        const uint32_t word = static_cast<uint32_t>(merged >> (sh & ~31));
        return lut(table, byte_of(word, (sh & 31) >> 3) << SHIFT);
    }
    const uint32_t bits = sh >= SHIFT ? static_cast<uint32_t>(merged >> (sh - SHIFT))
                                      : static_cast<uint32_t>(merged << (SHIFT - sh));
    return lut(table, bits & kMask);
}

/// value_pair for 4-bit values read from the mixed-row table (row_lut).
template <uint32_t TABLE, typename C>
__device__ __forceinline__ uint32_t value_pair_row(C merged, int field, uint32_t lane4) {
    const int sh = 8 * field;
    return row_lut<TABLE>(static_cast<uint32_t>(merged >> (sh & ~31)), (sh & 31) >> 3, lane4);
}

}  // namespace veloxquant::cuda::kernels
