// The score step of the decode kernel (turboquant_decode.cuh): S^T = K_codes x Q' for one page's
// four 16-token tiles, sc[mt] being tile mt's C fragment (rows: tokens; columns: the query
// fragments' columns, decode_fragments.cuh), summed over the key stages with each stage's weight.
// One function per way of scoring: 1-bit keys, and 2-bit keys in groups of up to 4 or in mixed
// rows, in integers (mma m16n8k32 u8/s8 x s8 against the query's int8 hi and lo columns, in one
// or two blocks of four heads), wider keys and the general kernel's 2-bit keys in groups of 5..8
// in fp16 (mma m16n8k16).
// `keys(page, s, mt, w0, w1)` loads this thread's code chunks of stage s of tile mt's tokens
// row_token (w0) and 8 + row_token (w1) from the page's slot. The stages: STAGES, or where that is
// 0 the layout's (read at each stage, as a kernel parameter, rather than held in a register).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/cuda_cache.h"
#include "cuda/decode_fragments.cuh"
#include "cuda/turboquant_kernels.cuh"

namespace veloxquant::cuda::kernels {

/// Words of a thread's chunk of one key stage (D / 4 coordinates of KBITS bits).
template <int D, int KBITS>
constexpr int kKeyChunkWords = ((D / 4) * KBITS / 8 + 3) / 4;

/// The key stages a page's scores sum: STAGES, or where that is 0 the layout's.
template <int STAGES>
__device__ __forceinline__ int score_stages(const TqPageLayout& layout) {
    return STAGES > 0 ? STAGES : layout.key_stages;
}

/// Zeroes a tile's C fragment.
template <class T>
__device__ __forceinline__ void zero_tile(T (&c)[4]) {
    c[0] = c[1] = c[2] = c[3] = T(0);
}

/// tile(mt, w0, w1) for the page's four tiles, with this thread's WORDS-word key chunks of stage s.
template <int WORDS, class Keys, class Tile>
__device__ __forceinline__ void for_each_tile(const Keys& keys, const uint8_t* page, int s,
                                              const Tile& tile) {
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
        uint32_t w0[WORDS], w1[WORDS];
        keys(page, s, mt, w0, w1);
        tile(mt, w0, w1);
    }
}

/// Head_dim 64's 1-bit key bytes: byte i of r[s] is minus bit 4i + s of the lane's 16-bit chunk w
/// (0 or -1 as s8) for s < 3, one PRMT each. PRMT picks byte (nibble & 7) of an 8-byte pool whose
/// byte k is -(bit s of k); where a selector nibble's bit 3 asks for the sign of the picked byte
/// instead, the pool's 0x00 and 0xFF bytes are their own sign, so bit 3 never matters there. r[3]
/// takes bit 3 itself from a pool of 0x01 bytes: the picked 0x01, or its sign (0) where bit 3 is
/// set, so its bytes are 1 - bit, and every sum over them carries the B column's sum over their k
/// positions (key_byte_offset_d64), which the caller takes off. (Spreading the chunk's nibbles into
/// bytes and masking took 16 instructions a tile; -bit 3 from the nibbles of w >> 1, 10.)
__device__ __forceinline__ void minus_key_bytes_d64(uint32_t w, uint32_t (&r)[4]) {
    r[0] = permute_bytes(0xFF00FF00u, 0xFF00FF00u, w);
    r[1] = permute_bytes(0xFFFF0000u, 0xFFFF0000u, w);
    r[2] = permute_bytes(0u, 0xFFFFFFFFu, w);
    r[3] = permute_bytes(0x01010101u, 0x01010101u, w);
}

/// What minus_key_bytes_d64's 1 - bit bytes add to thread (g, t)'s score of each head block b
/// (columns 2t and 2t + 1, its head's hi and lo sums joined as 256 hi + lo): the sum of B over
/// r[3]'s k positions, the bytes of slot 1 of k32 block 1 (query_fragments_i8), of each column,
/// summed over the four lanes that hold that column. Set-up only (shuffles of the whole warp).
template <int NB>
__device__ __forceinline__ void key_byte_offset_d64(const uint32_t (&bq8)[NB][2][2], int t,
                                                    int (&offset)[NB]) {
#pragma unroll
    for (int b = 0; b < NB; ++b) {
        const uint32_t x = bq8[b][1][1];
        int c = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) c += static_cast<int8_t>(x >> (8 * i));
        c += __shfl_xor_sync(kFull, c, 1);
        c += __shfl_xor_sync(kFull, c, 2);  // column g's sum, in each lane of group g
        offset[b] = 256 * __shfl_sync(kFull, c, 8 * t) + __shfl_sync(kFull, c, 8 * t + 4);
    }
}

/// 1-bit keys: key bytes of 0 or 1 (slot 0) and 0 or 2 (slot 1) against the int8 query
/// (query_fragments_i8), or at head_dim 64 bytes of 0 or -1 against -Q (minus_key_bytes_d64, whose
/// fourth register's 1 - bit bytes leave each score key_byte_offset_d64 too high: the caller
/// takes that off); the hi and lo columns' sums join as 256 hi + lo. With FOLD_WEIGHT (one stage)
/// the stage weight C1 - C0 is left to the caller's multiplier. NB column blocks of four heads (hi
/// and lo columns) share each key fragment: block b's score of the thread's head lands in sc[mt][2
/// r + b].
template <int D, int STAGES, bool FOLD_WEIGHT, int NB, class Keys>
__device__ __forceinline__ void scores_1bit_i8(float (&sc)[4][4], const TqPageLayout& layout,
                                               const Keys& keys, const uint8_t* page,
                                               const uint32_t (&bq8)[NB][D / 32][2],
                                               const float (&key_affine)[kMaxStages][2]) {
    static_assert(NB == 1 || NB == 2, "one or two blocks of four heads");
    constexpr int kWords = kKeyChunkWords<D, 1>;
    for (int s = 0; s < score_stages<STAGES>(layout); ++s) {
        int acc[NB][4][4];
        for_each_tile<kWords>(keys, page, s, [&](int mt, const auto& w0, const auto& w1) {
#pragma unroll
            for (int b = 0; b < NB; ++b) zero_tile(acc[b][mt]);
            if constexpr (D == 64) {
                uint32_t r0[4], r1[4];  // slot s = 2 kb + r of rows g and g + 8
                minus_key_bytes_d64(w0[0], r0);
                minus_key_bytes_d64(w1[0], r1);
#pragma unroll
                for (int kb = 0; kb < 2; ++kb) {
                    const uint32_t af[4] = {r0[2 * kb], r1[2 * kb], r0[2 * kb + 1], r1[2 * kb + 1]};
#pragma unroll
                    for (int b = 0; b < NB; ++b)
                        mma_16832_i8<true>(acc[b][mt], af, bq8[b][kb][0], bq8[b][kb][1]);
                }
            } else {
#pragma unroll
                for (int kb = 0; kb < D / 32; ++kb) {
                    // bits 2 kb + 8 i as 0/1 bytes, bits 2 kb + 1 + 8 i as 0/2 bytes
                    const uint32_t y0 = w0[0] >> (2 * kb), y1 = w1[0] >> (2 * kb);
                    const uint32_t af[4] = {y0 & 0x01010101u, y1 & 0x01010101u, y0 & 0x02020202u,
                                            y1 & 0x02020202u};
#pragma unroll
                    for (int b = 0; b < NB; ++b)
                        mma_16832_i8<false>(acc[b][mt], af, bq8[b][kb][0], bq8[b][kb][1]);
                }
            }
        });
        const float w = key_affine[s][1];  // C1 - C0
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int b = 0; b < NB; ++b) {
                    const float q_b =
                        static_cast<float>(acc[b][mt][2 * r] * 256 + acc[b][mt][2 * r + 1]);
                    sc[mt][2 * r + b] = FOLD_WEIGHT ? q_b : fmaf(w, q_b, sc[mt][2 * r + b]);
                }
    }
}

/// The A fragments of one k32 block of 2-bit keys in integers: the high (ah) and low (al) bytes
/// of the centroids whose codes are this thread's chunk words x0 (row g) and x1 (row g + 8) shifted
/// to the block's 16 bits, each byte picked by one PRMT from the stage's four (key_i8). Slot r of
/// the block holds coordinates 8 kb + r + 2 i of the chunk, whose codes are nibbles i shifted by
/// 2 r.
__device__ __forceinline__ void key_i8_fragments(uint32_t x0, uint32_t x1, uint32_t hi_bytes,
                                                 uint32_t lo_bytes, uint32_t (&ah)[4],
                                                 uint32_t (&al)[4]) {
    const uint32_t sel[4] = {x0 & 0x3333u, x1 & 0x3333u, (x0 >> 2) & 0x3333u, (x1 >> 2) & 0x3333u};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        ah[q] = __byte_perm(hi_bytes, 0, sel[q]);
        al[q] = __byte_perm(lo_bytes, 0, sel[q]);
    }
}

/// 2-bit keys: sums of the centroids' high parts (hi) and low parts (lo), each byte picked by
/// one PRMT from the stage's four (key_i8). (One fixed-point scale for every stage and one sum
/// over the stages measured 5% slower at head_dim 64, the same at 128.)
template <int D, int STAGES, class Keys>
__device__ __forceinline__ void scores_2bit_i8(float (&sc)[4][4], const TqPageLayout& layout,
                                               const Keys& keys, const uint8_t* page,
                                               const uint32_t (&bq8)[D / 32][2],
                                               const uint32_t (&key_i8)[kMaxStages][2],
                                               const float (&key_affine)[kMaxStages][2]) {
    constexpr int kWords = kKeyChunkWords<D, 2>;
    for (int s = 0; s < score_stages<STAGES>(layout); ++s) {
        int hi[4][4], lo[4][4];
        const uint32_t hi_bytes = key_i8[s][0], lo_bytes = key_i8[s][1];
        for_each_tile<kWords>(keys, page, s, [&](int mt, const auto& w0, const auto& w1) {
            zero_tile(hi[mt]), zero_tile(lo[mt]);
#pragma unroll
            for (int kb = 0; kb < D / 32; ++kb) {
                uint32_t ah[4], al[4];
                key_i8_fragments(w0[kb >> 1] >> (16 * (kb & 1)), w1[kb >> 1] >> (16 * (kb & 1)),
                                 hi_bytes, lo_bytes, ah, al);
                mma_16832_i8<true>(hi[mt], ah, bq8[kb][0], bq8[kb][1]);
                mma_16832_i8<true>(lo[mt], al, bq8[kb][0], bq8[kb][1]);
            }
        });
        const float w = key_affine[s][1] * (1.0f / kKeyI8Scale);  // max|C| / scale
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float h = static_cast<float>(hi[mt][2 * r] * 256 + hi[mt][2 * r + 1]);
                const float l = static_cast<float>(lo[mt][2 * r] * 256 + lo[mt][2 * r + 1]);
                sc[mt][2 * r] = fmaf(w, fmaf(256.0f, h, l), sc[mt][2 * r]);
            }
        }
    }
}

/// 2-bit keys of groups of 5..8 in integers: two blocks of four heads (int8 hi and lo query
/// columns each) on the same key fragments, the tiles one by one with every stage summed into the
/// tile's accumulators, which key_i8 in one fixed-point scale for all stages allows (`weight`: the
/// largest |centroid| of any stage / kKeyI8Scale): 16 integer accumulators live instead of 64 for
/// the four tiles' hi and lo sums of each block stage by stage. Block b's score of the thread's
/// head lands in sc[mt][2 r + b], as in scores_1bit_i8.
template <int D, int STAGES, class Keys>
__device__ __forceinline__ void scores_2bit_i8_two_blocks(float (&sc)[4][4], const Keys& keys,
                                                          const uint8_t* page,
                                                          const uint32_t (&bq8)[2][D / 32][2],
                                                          const uint32_t (&key_i8)[kMaxStages][2],
                                                          float weight) {
    static_assert(STAGES > 0, "a compile-time stage count");
    constexpr int kWords = kKeyChunkWords<D, 2>;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
        int hi[2][4], lo[2][4];
#pragma unroll
        for (int b = 0; b < 2; ++b) zero_tile(hi[b]), zero_tile(lo[b]);
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            uint32_t w0[kWords], w1[kWords];
            keys(page, s, mt, w0, w1);
#pragma unroll
            for (int kb = 0; kb < D / 32; ++kb) {
                uint32_t ah[4], al[4];
                key_i8_fragments(w0[kb >> 1] >> (16 * (kb & 1)), w1[kb >> 1] >> (16 * (kb & 1)),
                                 key_i8[s][0], key_i8[s][1], ah, al);
#pragma unroll
                for (int b = 0; b < 2; ++b) {
                    mma_16832_i8<true>(hi[b], ah, bq8[b][kb][0], bq8[b][kb][1]);
                    mma_16832_i8<true>(lo[b], al, bq8[b][kb][0], bq8[b][kb][1]);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int b = 0; b < 2; ++b) {
                const float h = static_cast<float>(hi[b][2 * r] * 256 + hi[b][2 * r + 1]);
                const float l = static_cast<float>(lo[b][2 * r] * 256 + lo[b][2 * r + 1]);
                sc[mt][2 * r + b] = weight * fmaf(256.0f, h, l);
            }
    }
}

/// Keys of 2 bits (groups of 5..8, general kernel), 3 and 4 bits in fp16: each pair field
/// indexes the stage's half2 pair table, in mixed rows (4-bit keys: MIXED_TABLE, lane4: row_lut)
/// or at `pairs(s)` (entries KEY_SHIFT apart).
template <int D, int KBITS, int STAGES, bool MIXED, uint32_t MIXED_TABLE, int KEY_SHIFT, class Keys,
          class Pairs>
__device__ __forceinline__ void scores_f16(float (&sc)[4][4], const TqPageLayout& layout,
                                           const Keys& keys, const uint8_t* page,
                                           const uint32_t (&bq)[D / 16][2], const Pairs& pairs,
                                           uint32_t lane4,
                                           const float (&key_affine)[kMaxStages][2]) {
    static_assert(KBITS >= 2, "1-bit keys score in integers (scores_1bit_i8)");
    constexpr int kWords = kKeyChunkWords<D, KBITS>;
    for (int s = 0; s < score_stages<STAGES>(layout); ++s) {
        float acc[4][4];
        for_each_tile<kWords>(keys, page, s, [&](int mt, const auto& w0, const auto& w1) {
            zero_tile(acc[mt]);
#pragma unroll
            for (int kb = 0; kb < D / 16; ++kb) {
                uint32_t af[4];
                if constexpr (MIXED) {
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const int pos = (4 * kb + 2 * r) * KBITS;
                        af[2 * r] = row_lut<MIXED_TABLE>(w0[pos >> 5], (pos & 31) >> 3, lane4);
                        af[2 * r + 1] = row_lut<MIXED_TABLE>(w1[pos >> 5], (pos & 31) >> 3, lane4);
                    }
                } else {
                    const uint32_t* table = pairs(s);
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const int pos = (4 * kb + 2 * r) * KBITS;
                        af[2 * r] = lut(table, field_offset<KEY_SHIFT>(w0, pos, 2 * KBITS));
                        af[2 * r + 1] = lut(table, field_offset<KEY_SHIFT>(w1, pos, 2 * KBITS));
                    }
                }
                mma_16816(acc[mt], af, bq[kb][0], bq[kb][1]);
            }
        });
        const float w = key_affine[s][1];  // C1 - C0 (1 bit) or the pair table's scale
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int c = 0; c < 4; ++c) sc[mt][c] = fmaf(w, acc[mt][c], sc[mt][c]);
    }
}

}  // namespace veloxquant::cuda::kernels
