// ggml block layouts and reference dequantizers for the tensor types found in GGUF files.
//
// Every quantized type stores a row as consecutive fixed-size blocks. The structs below mirror
// ggml's src/ggml-common.h field for field (fp16 scales are raw IEEE half bits); their sizes are
// part of the file format, hence the static_asserts. Multi-byte fields are little-endian.
#pragma once

#include <cstddef>
#include <cstdint>

#include "model/gguf.h"

namespace veloxquant {

constexpr int kQK = 32;          // elements per block of the legacy types (Q4_0 ... Q8_1)
constexpr int kQKK = 256;        // elements per super-block of the K-quants
constexpr int kKScaleSize = 12;  // bytes of packed 6-bit scales and mins in Q4_K / Q5_K

/// 4-bit, symmetric: x = (q - 8) * d. Byte j holds element j (low nibble) and j + 16 (high).
struct BlockQ4_0 {
    uint16_t d;
    uint8_t qs[kQK / 2];
};
static_assert(sizeof(BlockQ4_0) == 2 + kQK / 2, "wrong q4_0 block size");

/// 4-bit, affine: x = q * d + m. Nibble order as Q4_0.
struct BlockQ4_1 {
    uint16_t d;
    uint16_t m;
    uint8_t qs[kQK / 2];
};
static_assert(sizeof(BlockQ4_1) == 4 + kQK / 2, "wrong q4_1 block size");

/// 5-bit, symmetric: x = (q - 16) * d. Low 4 bits as Q4_0; bit 4 of element j is bit j of qh.
struct BlockQ5_0 {
    uint16_t d;
    uint8_t qh[4];
    uint8_t qs[kQK / 2];
};
static_assert(sizeof(BlockQ5_0) == 2 + 4 + kQK / 2, "wrong q5_0 block size");

/// 5-bit, affine: x = q * d + m. Bit layout as Q5_0.
struct BlockQ5_1 {
    uint16_t d;
    uint16_t m;
    uint8_t qh[4];
    uint8_t qs[kQK / 2];
};
static_assert(sizeof(BlockQ5_1) == 4 + 4 + kQK / 2, "wrong q5_1 block size");

/// 8-bit, symmetric: x = q * d.
struct BlockQ8_0 {
    uint16_t d;
    int8_t qs[kQK];
};
static_assert(sizeof(BlockQ8_0) == 2 + kQK, "wrong q8_0 block size");

/// 8-bit with s = d * sum(qs); only used as a matmul intermediate in ggml.
struct BlockQ8_1 {
    uint16_t d;
    uint16_t s;
    int8_t qs[kQK];
};
static_assert(sizeof(BlockQ8_1) == 4 + kQK, "wrong q8_1 block size");

/// 2-bit K-quant: 16 sub-blocks of 16, 4-bit scale and 4-bit min per sub-block.
struct BlockQ2_K {
    uint8_t scales[kQKK / 16];
    uint8_t qs[kQKK / 4];
    uint16_t d;
    uint16_t dmin;
};
static_assert(sizeof(BlockQ2_K) == 2 * 2 + kQKK / 16 + kQKK / 4, "wrong q2_K block size");

/// 3-bit K-quant: 16 sub-blocks of 16, 6-bit scales.
struct BlockQ3_K {
    uint8_t hmask[kQKK / 8];
    uint8_t qs[kQKK / 4];
    uint8_t scales[12];
    uint16_t d;
};
static_assert(sizeof(BlockQ3_K) == 2 + kQKK / 4 + kQKK / 8 + 12, "wrong q3_K block size");

/// 4-bit K-quant: 8 sub-blocks of 32, x = d * sc * q - dmin * m with 6-bit sc and m packed in
/// `scales`. Each 64-element chunk c uses qs[32c, 32c + 32): low nibbles are sub-block 2c, high
/// nibbles sub-block 2c + 1.
struct BlockQ4_K {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[kKScaleSize];
    uint8_t qs[kQKK / 2];
};
static_assert(sizeof(BlockQ4_K) == 2 * 2 + kKScaleSize + kQKK / 2, "wrong q4_K block size");

/// 5-bit K-quant: Q4_K plus a fifth bit; bit s of qh[l] is the high bit of element l of sub-block
/// s.
struct BlockQ5_K {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[kKScaleSize];
    uint8_t qh[kQKK / 8];
    uint8_t qs[kQKK / 2];
};
static_assert(sizeof(BlockQ5_K) == 2 * 2 + kKScaleSize + kQKK / 2 + kQKK / 8,
              "wrong q5_K block size");

/// 6-bit K-quant: 16 sub-blocks of 16 with int8 scales, x = d * scale * (q - 32). Note d is last.
struct BlockQ6_K {
    uint8_t ql[kQKK / 2];  // low 4 bits
    uint8_t qh[kQKK / 4];  // high 2 bits
    int8_t scales[kQKK / 16];
    uint16_t d;
};
static_assert(sizeof(BlockQ6_K) == kQKK / 2 + kQKK / 4 + kQKK / 16 + 2, "wrong q6_K block size");

/// 8-bit K-quant with a float scale; a matmul intermediate in ggml.
struct BlockQ8_K {
    float d;
    int8_t qs[kQKK];
    int16_t bsums[kQKK / 16];
};
static_assert(sizeof(BlockQ8_K) == 4 + kQKK + kQKK / 16 * 2, "wrong q8_K block size");

/// Elements per block (1 for F32/F16/BF16); throws std::invalid_argument for an unknown type.
int ggml_block_size(GGMLType type);
/// Bytes per block; throws std::invalid_argument for an unknown type.
std::size_t ggml_type_size(GGMLType type);
/// Bytes of a row of n elements; throws std::invalid_argument if n is negative, not a multiple of
/// the block size, or the size overflows.
std::size_t ggml_row_bytes(GGMLType type, int64_t n);

/// Whether dequantize_row supports `type`.
bool ggml_can_dequantize(GGMLType type);
/// Converts n elements (a multiple of the block size) stored as `type` at src to floats.
/// Supports F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K; throws
/// std::invalid_argument for other types or a bad n. src needs no particular alignment.
void dequantize_row(GGMLType type, const void* src, float* dst, int64_t n);

}  // namespace veloxquant
