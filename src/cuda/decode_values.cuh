// The value step of the decode kernel (turboquant_decode.cuh): O^T += V_codes^T x P'^T over one
// page's four 16-token blocks (mma m16n8k16, fp16), the A fragments looked up from the value
// codes in the value rotation's domain, P'^T the B fragments bp[kb] of block kb. One branch per
// way of reading the codes:
//   fp16 values                   the chunks' halves are the A fragments;
//   dimension pairs (DIM_PAIRS)   mixed rows at 2-bit values or at 4-bit values beside 2-bit
//                                 keys: the lo columns of P' carry a second dimension of the same
//                                 token, so a table entry needs no pairing of two tokens' codes;
//   value matrices (MATRICES)     2-bit values at head_dim 64 in mixed rows, the chunks of two
//                                 blocks from one LDSM.x4.trans (`value_regs`);
//   byte-indexed (V64)            2-bit values, a byte of two tokens' codes indexing the table of
//                                 uint2 entries (`v64_lane`, or mixed row entries);
//   pair tables                   a byte of two tokens' codes indexing the pair table
//                                 (`value_table`, or the mixed rows' lane copies).
// `block_at(kb)` is this thread's chunk of token t of block kb; token t + 4 k's lies k token
// strides on (`token_stride` bytes, or in mixed rows mixed_delta of k tokens' codes).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/decode_fragments.cuh"
#include "cuda/decode_layout.cuh"
#include "cuda/ptx_wrappers.cuh"

namespace veloxquant::cuda::kernels {

template <int D, int VBITS, bool MIXED, bool DIM_PAIRS, bool MATRICES, bool V64, uint32_t TABLE,
          int VALUE_SHIFT, int BYTE_COPIES, typename BlockAt>
__device__ __forceinline__ void page_values(float (&o)[D / 16][4], const uint32_t (&bp)[4][2],
                                            BlockAt block_at, uint32_t token_stride,
                                            const uint32_t (&value_regs)[2][4], uint2 pair_sel,
                                            const uint8_t* v64_lane, const uint32_t* value_table,
                                            uint32_t lane4, uint32_t lane8) {
    constexpr int kDims = D / 8;  // value dimensions per lane group
    constexpr int kVTiles = D / 16;
    constexpr int kValueChunk = kDims * VBITS / 8;  // bytes
    constexpr int kValueTok = D * VBITS / 8;
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
        const uint8_t* tok = block_at(kb);
        // This thread's chunk of token t + 4 k of the block
        auto chunk = [&](int k) {
            return tok + (MIXED ? mixed_delta(4 * k * kValueTok) : k * 4 * token_stride);
        };
        if constexpr (VBITS == 16) {
            uint32_t w[4][kDims / 2];
#pragma unroll
            for (int k = 0; k < 4; ++k) load_chunk<kValueChunk>(chunk(k), w[k]);
#pragma unroll
            for (int v = 0; v < kVTiles; ++v) {
                const uint32_t af[4] = {
                    __byte_perm(w[0][v], w[1][v], 0x5410), __byte_perm(w[0][v], w[1][v], 0x7632),
                    __byte_perm(w[2][v], w[3][v], 0x5410), __byte_perm(w[2][v], w[3][v], 0x7632)};
                mma_16816(o[v], af, bp[kb][0], bp[kb][1]);
            }
        } else if constexpr (DIM_PAIRS) {
            // Tokens t, t + 4 (h = 0) and t + 8, t + 12 (h = 1) of the block, a k16 step each,
            // tile m's A rows from a token's chunk: at 2-bit values byte m, dimensions g D/8 +
            // 4 m .. + 3 (entry .x: rows g, .y: rows g + 8; halves: columns 2h, 2h + 1; at
            // head_dim 64 one register holds both tokens' chunks, bytes m and 2 + m); at 4-bit
            // values bytes 2 m (rows g) and 2 m + 1 (rows g + 8), a byte's two dimensions the
            // columns' halves.
            using C = ValueChunk<D, VBITS>;
            [[maybe_unused]] C c[4];
            if constexpr (!MATRICES) {
#pragma unroll
                for (int k = 0; k < 4; ++k) c[k] = load_value_chunk<D, VBITS>(chunk(k));
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint32_t b0 = permute_bytes(bp[kb][h], 0u, pair_sel.x),
                               b1 = permute_bytes(bp[kb][h], 0u, pair_sel.y);
#pragma unroll
                for (int m = 0; m < D / 32; ++m) {
                    uint32_t af[4];
                    if constexpr (VBITS == 4) {
                        af[0] = value_pair_row<TABLE>(c[2 * h], 2 * m, lane4);
                        af[1] = value_pair_row<TABLE>(c[2 * h], 2 * m + 1, lane4);
                        af[2] = value_pair_row<TABLE>(c[2 * h + 1], 2 * m, lane4);
                        af[3] = value_pair_row<TABLE>(c[2 * h + 1], 2 * m + 1, lane4);
                    } else {
                        uint2 e0, e1;
                        if constexpr (MATRICES) {
                            const uint32_t y = value_regs[kb >> 1][2 * (kb & 1) + h];
                            e0 = row_lut64<TABLE>(y, m, lane8);
                            e1 = row_lut64<TABLE>(y, 2 + m, lane8);
                        } else {
                            e0 = row_lut64<TABLE>(static_cast<uint32_t>(c[2 * h]), m, lane8);
                            e1 = row_lut64<TABLE>(static_cast<uint32_t>(c[2 * h + 1]), m, lane8);
                        }
                        af[0] = e0.x, af[1] = e0.y, af[2] = e1.x, af[3] = e1.y;
                    }
                    mma_16816(o[m + D / 32 * h], af, b0, b1);
                }
            }
        } else if constexpr (MATRICES) {
            // The chunks of tokens t, t + 4 (y01) and t + 8, t + 12 (y23) of the block;
            // pair_bytes puts the entry index of tile v in byte 2 (v % 2) + v / 2.
            const uint32_t y01 = pair_bytes(value_regs[kb >> 1][2 * (kb & 1)]);
            const uint32_t y23 = pair_bytes(value_regs[kb >> 1][2 * (kb & 1) + 1]);
#pragma unroll
            for (int v = 0; v < kVTiles; ++v) {
                const int byte = 2 * (v & 1) + (v >> 1);
                const uint2 e01 = row_lut64<TABLE>(y01, byte, lane8);
                const uint2 e23 = row_lut64<TABLE>(y23, byte, lane8);
                const uint32_t af[4] = {e01.x, e01.y, e23.x, e23.y};
                mma_16816(o[v], af, bp[kb][0], bp[kb][1]);
            }
        } else if constexpr (V64) {
            // Bytes j of x[0] / x[1]: both tokens' nibbles 2j / 2j + 1 (dims 4j, 4j + 1 / 4j +
            // 2, 4j + 3), the entry index of tile 2j / 2j + 1 (the 4-bit pairing of
            // merge_even).
            const uint32_t c0 = load_value_chunk<D, VBITS>(chunk(0)),
                           c1 = load_value_chunk<D, VBITS>(chunk(1));
            const uint32_t c2 = load_value_chunk<D, VBITS>(chunk(2));
            const uint32_t c3 = load_value_chunk<D, VBITS>(chunk(3));
            const uint32_t x01[2] = {merge_even<4>(c0, c1), merge_odd<4>(c0, c1)};
            const uint32_t x23[2] = {merge_even<4>(c2, c3), merge_odd<4>(c2, c3)};
#pragma unroll
            for (int v = 0; v < kVTiles; ++v) {
                uint2 e01, e23;
                if constexpr (MIXED) {
                    e01 = row_lut64<TABLE>(x01[v & 1], v >> 1, lane8);
                    e23 = row_lut64<TABLE>(x23[v & 1], v >> 1, lane8);
                } else {
                    const uint32_t i01 = byte_of(x01[v & 1], v >> 1),
                                   i23 = byte_of(x23[v & 1], v >> 1);
                    e01 = *reinterpret_cast<const uint2*>(v64_lane +
                                                          i01 * (BYTE_COPIES * sizeof(uint2)));
                    e23 = *reinterpret_cast<const uint2*>(v64_lane +
                                                          i23 * (BYTE_COPIES * sizeof(uint2)));
                }
                const uint32_t af[4] = {e01.x, e01.y, e23.x, e23.y};
                mma_16816(o[v], af, bp[kb][0], bp[kb][1]);
            }
        } else {
            using C = ValueChunk<D, VBITS>;
            const C c0 = load_value_chunk<D, VBITS>(chunk(0)),
                    c1 = load_value_chunk<D, VBITS>(chunk(1));
            const C c2 = load_value_chunk<D, VBITS>(chunk(2));
            const C c3 = load_value_chunk<D, VBITS>(chunk(3));
            const C e01 = merge_even<VBITS>(c0, c1), o01 = merge_odd<VBITS>(c0, c1);
            const C e23 = merge_even<VBITS>(c2, c3), o23 = merge_odd<VBITS>(c2, c3);
#pragma unroll
            for (int v = 0; v < kVTiles; ++v) {
                uint32_t af[4];
                if constexpr (MIXED) {
                    af[0] = value_pair_row<TABLE>(e01, v, lane4);
                    af[1] = value_pair_row<TABLE>(o01, v, lane4);
                    af[2] = value_pair_row<TABLE>(e23, v, lane4);
                    af[3] = value_pair_row<TABLE>(o23, v, lane4);
                } else {
                    af[0] = value_pair<VBITS, VALUE_SHIFT>(value_table, e01, v);
                    af[1] = value_pair<VBITS, VALUE_SHIFT>(value_table, o01, v);
                    af[2] = value_pair<VBITS, VALUE_SHIFT>(value_table, e23, v);
                    af[3] = value_pair<VBITS, VALUE_SHIFT>(value_table, o23, v);
                }
                mma_16816(o[v], af, bp[kb][0], bp[kb][1]);
            }
        }
    }
}

}  // namespace veloxquant::cuda::kernels
