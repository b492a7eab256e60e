// The generic attention's value sum on tensor cores (codec_attention_kernel): for every row r
// of a CTA and coordinate j, o[r][j] += sum_t w[r][t] c[t][j] over a warp's 32-token chunk, as
// mma m16n8k16 with A = the value tile transposed (16 coordinates x 16 tokens, fp16, through
// ldmatrix.trans), B = the rows' weights (16 tokens x 8 rows, fp16) and fp32 accumulators.
//
// Every method stores its values with the value codec (src/device_codecs/value_device.h): a
// token is scale_t * (centroid of each b-bit field), in the rotated domain, or fp16 (b = 16).
// The tile holds the centroids only; the scale goes into the weights, relative to the chunk's
// largest |scale| S (w = p s_t / S, so |w| <= 1 in fp16 whatever the values' magnitude), and S
// into the accumulators' running factor (ValueSum::begin_chunk).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/ptx_wrappers.cuh"
#include "device_codecs/value_device.h"

namespace veloxquant::cuda::codec {

constexpr int kTileTokens = 16;    // tokens per value tile (one mma k step)
constexpr int kWeightRows = 8;     // the mma's n: rows of weights (R <= 8; the rest stay zero)
constexpr int kWeightStride = 40;  // halves per weight row: 32 tokens, padded so that the
                                   // B-fragment loads of the 8 rows hit distinct banks

/// Halves per row of the value tile: D plus 8, so that ldmatrix's 8 rows (16 bytes each, rows
/// 2 D + 16 bytes apart) fall in 8 different bank groups.
__host__ __device__ constexpr int tile_stride(int D) {
    return D + 8;
}

/// Bytes of a warp's value tile, and of its weights.
__host__ __device__ constexpr size_t tile_bytes(int D) {
    return kTileTokens * tile_stride(D) * sizeof(__half);
}
__host__ __device__ constexpr size_t weights_bytes() {
    return kWeightRows * kWeightStride * sizeof(__half);
}

/// The value table in shared memory, in halves: for widths dividing 8 (1, 2, 4, 8) a code byte's
/// 8 / b centroids for each of the 256 bytes, else one centroid per field value; none for fp16.
__host__ __device__ constexpr int value_table_halves(int bits) {
    return bits == 16 ? 0 : 8 % bits == 0 ? 256 * (8 / bits) : 1 << bits;
}

/// The same in floats, a multiple of 4 (the table is read 16 bytes at a time).
__host__ __device__ constexpr int value_table_floats(int bits) {
    return (value_table_halves(bits) + 7) / 8 * 4;
}

/// Fills the value table from the codec's centroids, block-parallel; the caller synchronizes.
__device__ inline void fill_value_table(const dev::ValueDevice::Params& vp, __half* table) {
    const int bits = vp.bits;
    if (bits == 16) return;
    const int per = 8 % bits == 0 ? 8 / bits : 1;  // centroids per entry
    for (int i = threadIdx.x; i < value_table_halves(bits); i += blockDim.x) {
        const int entry = i / per, k = i - entry * per;
        const int field = per > 1 ? (entry >> (k * bits)) & ((1 << bits) - 1) : entry;
        table[i] = __float2half_rn(vp.centroids[field]);
    }
}

/// Where a lane starts in a walk over `units` units per row of a tile's `rows` rows (16, or a
/// wide prefill warp's 8), and how far one step of the warp (32 units) moves it: computed once,
/// stepped without a division.
struct TileWalk {
    int row = 0, unit = 0, step_rows = 0, step_units = 0, units = 1, rows = kTileTokens;
    __device__ TileWalk(int units_per_row, int lane, int tile_rows = kTileTokens)
        : row(lane / units_per_row),
          unit(lane % units_per_row),
          step_rows(32 / units_per_row),
          step_units(32 % units_per_row),
          units(units_per_row),
          rows(tile_rows) {}
    __device__ void next() {
        row += step_rows;
        unit += step_units;
        if (unit >= units) unit -= units, ++row;
    }
};

/// One 4-byte unit of codes of a width dividing 8: each byte's PER centroids from the table,
/// stored as 4 * PER consecutive halves (16-byte stores where they fill them).
template <int PER>
__device__ __forceinline__ void decode_word(uint32_t word, const __half* table, __half* dst) {
    static_assert(PER == 1 || PER == 2 || PER == 4 || PER == 8, "8 / bits centroids a byte");
    auto byte = [word](int k) { return (word >> (8 * k)) & 0xffu; };
    if constexpr (PER == 8) {
#pragma unroll
        for (int k = 0; k < 4; ++k)
            reinterpret_cast<uint4*>(dst)[k] = reinterpret_cast<const uint4*>(table)[byte(k)];
    } else if constexpr (PER == 4) {
        const uint2* t = reinterpret_cast<const uint2*>(table);
#pragma unroll
        for (int k = 0; k < 4; k += 2) {
            const uint2 lo = t[byte(k)], hi = t[byte(k + 1)];
            reinterpret_cast<uint4*>(dst)[k / 2] = uint4{lo.x, lo.y, hi.x, hi.y};
        }
    } else if constexpr (PER == 2) {
        const uint32_t* t = reinterpret_cast<const uint32_t*>(table);
        *reinterpret_cast<uint4*>(dst) = uint4{t[byte(0)], t[byte(1)], t[byte(2)], t[byte(3)]};
    } else {
        const uint16_t* t = reinterpret_cast<const uint16_t*>(table);
        *reinterpret_cast<uint2*>(dst) = uint2{t[byte(0)] | (uint32_t{t[byte(1)]} << 16),
                                               t[byte(2)] | (uint32_t{t[byte(3)]} << 16)};
    }
}

/// The codes of a value tile: 16 staged rows of `row_bytes` bytes, `stride` bytes apart.
struct TileCodes {
    const uint8_t* rows;
    int stride, row_bytes, bits, d;
};

/// Decodes walk.rows (16) tokens' value codes into tile[rows][tile_stride(D)] (centroids without
/// the scale; fp16 values copied), lane-parallel over the rows' units; columns d .. D - 1 are
/// zeroed (the tile lies over the chunk's key codes or features). `walk` is the lane's start
/// (value_tile_walk).
template <int D>
__device__ void decode_value_tile(const TileCodes& c, const __half* table, __half* tile,
                                  TileWalk walk, int lane) {
    constexpr int TS = tile_stride(D);
    const int bits = c.bits;
    if ((bits == 16 || 8 % bits == 0) && c.row_bytes % 4 == 0) {
        // Whole 4-byte units (fp16: 2 halves; a width dividing 8: 4 bytes of fields).
        for (; walk.row < walk.rows; walk.next()) {
            const uint32_t word =
                *reinterpret_cast<const uint32_t*>(c.rows + walk.row * c.stride + 4 * walk.unit);
            __half* dst = tile + walk.row * TS;
            switch (bits) {
                case 16:
                    reinterpret_cast<uint32_t*>(dst)[walk.unit] = word;
                    break;
                case 1:
                    decode_word<8>(word, table, dst + 32 * walk.unit);
                    break;
                case 2:
                    decode_word<4>(word, table, dst + 16 * walk.unit);
                    break;
                case 4:
                    decode_word<2>(word, table, dst + 8 * walk.unit);
                    break;
                default:
                    decode_word<1>(word, table, dst + 4 * walk.unit);
                    break;
            }
        }
    } else {
        // Any other width, or rows that are not whole words: one field at a time (lanes over
        // coordinates; field f's centroid is the table's entry f, its first of `per`).
        const int per = bits != 16 && 8 % bits == 0 ? 8 / bits : 1;
        for (int i = lane; i < walk.rows * c.d; i += 32) {
            const int t = i / c.d, j = i - t * c.d;
            const uint8_t* row = c.rows + t * c.stride;
            tile[t * TS + j] =
                bits == 16
                    ? __ushort_as_half(static_cast<uint16_t>(row[2 * j] | (row[2 * j + 1] << 8)))
                    : table[per * dev::read_bits(row, j, bits)];
        }
    }
    if (c.d < D)
        for (int i = lane; i < walk.rows * (D - c.d); i += 32) {
            const int t = i / (D - c.d);
            tile[t * TS + c.d + (i - t * (D - c.d))] = __half{};
        }
}

/// The lane's walk for decode_value_tile over rows of `row_bytes` bytes (4-byte units).
__device__ inline TileWalk value_tile_walk(int row_bytes, int lane, int rows = kTileTokens) {
    return TileWalk(row_bytes >= 4 ? row_bytes / 4 : 1, lane, rows);
}

/// The running sum o[r][j] of a warp in mma C-fragment layout: lane (g, t) = (lane / 4,
/// lane % 4) holds, for each 16-coordinate block b, coordinates 16 b + g and 16 b + g + 8 of
/// rows 2 t and 2 t + 1 (registers 0, 1: coordinate 16 b + g; 2, 3: + 8). The true sum is
/// acc * factor (the last chunk's S).
template <int D>
struct ValueSum {
    static constexpr int kBlocks = D / 16;
    float acc[kBlocks][4];
    float factor = 1.0f;

    __device__ ValueSum() {
#pragma unroll
        for (int b = 0; b < kBlocks; ++b)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[b][i] = 0.0f;
    }

    /// The factor of a new chunk whose largest |scale| is top, the rows' largest softmax
    /// correction being corr_max: top itself (0: no weight, the factor stays), but no more than
    /// 2^64 below corr_max times the running factor, so that re-expressing the sums (begin_chunk)
    /// stays finite; what a larger drop would lose is under 2^-64 of the rows' sums so far. The
    /// chunk's weights are then scale / chunk_factor <= 1.
    __device__ __forceinline__ float chunk_factor(float top, float corr_max) const {
        return top == 0.0f ? factor : fmaxf(top, corr_max * factor * 0x1p-64f);
    }

    /// A new chunk of factor `top` (chunk_factor): rows r's sums are multiplied by corr[r] (the
    /// online softmax's correction) and re-expressed relative to it.
    template <int R>
    __device__ __forceinline__ void begin_chunk(const float (&corr)[R], float top, int lane) {
        const float k = factor / top;
        factor = top;
        const int n0 = 2 * (lane & 3);
        float f0 = 0.0f, f1 = 0.0f;  // rows past R have no weights: their sums stay 0
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (r == n0) f0 = corr[r] * k;
            if (r == n0 + 1) f1 = corr[r] * k;
        }
#pragma unroll
        for (int b = 0; b < kBlocks; ++b) {
            acc[b][0] *= f0;
            acc[b][1] *= f1;
            acc[b][2] *= f0;
            acc[b][3] *= f1;
        }
    }

    /// acc += tile^T * weights[:, k0 .. k0 + 15] for every coordinate block (tile rows
    /// `stride` halves apart: an odd multiple of 8).
    __device__ __forceinline__ void add_tile(const __half* tile, int stride, const __half* weights,
                                             int k0, int lane) {
        const __half* wrow = weights + (lane >> 2) * kWeightStride + k0 + 2 * (lane & 3);
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(wrow);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(wrow + 8);
        // ldmatrix.x4.trans: matrices (tokens 0-7 | 8-15) x (coordinates +0 | +8) are the A
        // fragment's registers 0 .. 3; lane i gives row i % 8 of matrix i / 8.
        const __half* base =
            tile + ((lane & 7) + ((lane >> 4) << 3)) * stride + ((lane >> 3) & 1) * 8;
#pragma unroll
        for (int b = 0; b < kBlocks; ++b) {
            uint32_t a[4];
            ldmatrix_x4<true>(a, base + 16 * b);
            mma_16816(acc[b], a, b0, b1);
        }
    }

    /// Writes row r's sum (times the factor) to rows + r * row_floats + j for r < rows.
    __device__ void store(float* out_rows, int row_floats, int rows, int lane) const {
        const int n0 = 2 * (lane & 3), g = lane >> 2;
#pragma unroll
        for (int b = 0; b < kBlocks; ++b)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = n0 + (i & 1), j = 16 * b + g + (i >= 2 ? 8 : 0);
                if (r < rows) out_rows[r * row_floats + j] = acc[b][i] * factor;
            }
    }
};

}  // namespace veloxquant::cuda::codec
