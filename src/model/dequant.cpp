#include "model/dequant.h"

#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "core/half.h"

namespace veloxquant {
namespace {

struct TypeTraits {
    int block_size;
    std::size_t type_size;
};

TypeTraits traits(GGMLType type) {
    switch (type) {
        case GGMLType::F32:
            return {1, 4};
        case GGMLType::F16:
            return {1, 2};
        case GGMLType::BF16:
            return {1, 2};
        case GGMLType::Q4_0:
            return {kQK, sizeof(BlockQ4_0)};
        case GGMLType::Q4_1:
            return {kQK, sizeof(BlockQ4_1)};
        case GGMLType::Q5_0:
            return {kQK, sizeof(BlockQ5_0)};
        case GGMLType::Q5_1:
            return {kQK, sizeof(BlockQ5_1)};
        case GGMLType::Q8_0:
            return {kQK, sizeof(BlockQ8_0)};
        case GGMLType::Q8_1:
            return {kQK, sizeof(BlockQ8_1)};
        case GGMLType::Q2_K:
            return {kQKK, sizeof(BlockQ2_K)};
        case GGMLType::Q3_K:
            return {kQKK, sizeof(BlockQ3_K)};
        case GGMLType::Q4_K:
            return {kQKK, sizeof(BlockQ4_K)};
        case GGMLType::Q5_K:
            return {kQKK, sizeof(BlockQ5_K)};
        case GGMLType::Q6_K:
            return {kQKK, sizeof(BlockQ6_K)};
        case GGMLType::Q8_K:
            return {kQKK, sizeof(BlockQ8_K)};
    }
    throw std::invalid_argument("ggml: unknown type id " +
                                std::to_string(static_cast<uint32_t>(type)));
}

// Blocks are copied out with memcpy so that src needs no alignment.
template <typename Block>
Block load_block(const uint8_t* src, int64_t i) {
    Block b;
    std::memcpy(&b, src + static_cast<std::size_t>(i) * sizeof(Block), sizeof(Block));
    return b;
}

void dequant_q4_0(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += kQK) {
        const auto b = load_block<BlockQ4_0>(src, i);
        const float d = half_to_float(b.d);
        for (int j = 0; j < kQK / 2; ++j) {
            y[j] = static_cast<float>((b.qs[j] & 0x0F) - 8) * d;
            y[j + kQK / 2] = static_cast<float>((b.qs[j] >> 4) - 8) * d;
        }
    }
}

void dequant_q4_1(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += kQK) {
        const auto b = load_block<BlockQ4_1>(src, i);
        const float d = half_to_float(b.d);
        const float m = half_to_float(b.m);
        for (int j = 0; j < kQK / 2; ++j) {
            y[j] = static_cast<float>(b.qs[j] & 0x0F) * d + m;
            y[j + kQK / 2] = static_cast<float>(b.qs[j] >> 4) * d + m;
        }
    }
}

// Q5_0 / Q5_1: the fifth bit of element j is bit j of the 32-bit little-endian word qh.
void dequant_q5_0(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += kQK) {
        const auto b = load_block<BlockQ5_0>(src, i);
        const float d = half_to_float(b.d);
        uint32_t qh;
        std::memcpy(&qh, b.qh, sizeof qh);
        for (int j = 0; j < kQK / 2; ++j) {
            const int h0 = static_cast<int>((qh >> j) & 1u) << 4;
            const int h1 = static_cast<int>((qh >> (j + kQK / 2)) & 1u) << 4;
            y[j] = static_cast<float>(((b.qs[j] & 0x0F) | h0) - 16) * d;
            y[j + kQK / 2] = static_cast<float>(((b.qs[j] >> 4) | h1) - 16) * d;
        }
    }
}

void dequant_q5_1(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += kQK) {
        const auto b = load_block<BlockQ5_1>(src, i);
        const float d = half_to_float(b.d);
        const float m = half_to_float(b.m);
        uint32_t qh;
        std::memcpy(&qh, b.qh, sizeof qh);
        for (int j = 0; j < kQK / 2; ++j) {
            const int h0 = static_cast<int>((qh >> j) & 1u) << 4;
            const int h1 = static_cast<int>((qh >> (j + kQK / 2)) & 1u) << 4;
            y[j] = static_cast<float>((b.qs[j] & 0x0F) | h0) * d + m;
            y[j + kQK / 2] = static_cast<float>((b.qs[j] >> 4) | h1) * d + m;
        }
    }
}

void dequant_q8_0(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += kQK) {
        const auto b = load_block<BlockQ8_0>(src, i);
        const float d = half_to_float(b.d);
        for (int j = 0; j < kQK; ++j) y[j] = static_cast<float>(b.qs[j]) * d;
    }
}

// Unpacks the 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes of Q4_K/Q5_K:
// bytes 0-3 hold sc[0..3] in their low 6 bits, bytes 4-7 m[0..3]; for j >= 4 the low 4 bits
// come from byte j + 4 (sc low nibble, m high nibble) and the top 2 bits from bits 6-7 of
// byte j - 4 (sc) or byte j (m).
void scale_min_k4(int j, const uint8_t* q, float* sc, float* m) {
    if (j < 4) {
        *sc = static_cast<float>(q[j] & 63);
        *m = static_cast<float>(q[j + 4] & 63);
    } else {
        *sc = static_cast<float>((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4));
        *m = static_cast<float>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

void dequant_q4_k(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i) {
        const auto b = load_block<BlockQ4_K>(src, i);
        const float d = half_to_float(b.d);
        const float dmin = half_to_float(b.dmin);
        const uint8_t* q = b.qs;
        for (int sub = 0; sub < 8; sub += 2, q += 32) {
            float sc, m;
            scale_min_k4(sub, b.scales, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            scale_min_k4(sub + 1, b.scales, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0x0F) - m1;
            for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
        }
    }
}

void dequant_q5_k(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i) {
        const auto b = load_block<BlockQ5_K>(src, i);
        const float d = half_to_float(b.d);
        const float dmin = half_to_float(b.dmin);
        const uint8_t* ql = b.qs;
        for (int sub = 0; sub < 8; sub += 2, ql += 32) {
            float sc, m;
            scale_min_k4(sub, b.scales, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            scale_min_k4(sub + 1, b.scales, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; ++l) {
                const int q = (ql[l] & 0x0F) | (((b.qh[l] >> sub) & 1) << 4);
                *y++ = d1 * static_cast<float>(q) - m1;
            }
            for (int l = 0; l < 32; ++l) {
                const int q = (ql[l] >> 4) | (((b.qh[l] >> (sub + 1)) & 1) << 4);
                *y++ = d2 * static_cast<float>(q) - m2;
            }
        }
    }
}

// Q6_K: each half of 128 elements uses 64 bytes of ql, 32 of qh and 8 scales. For l < 32 the
// four elements l, l+32, l+64, l+96 take the low nibble of ql[l], ql[l+32], then the high
// nibble of the same two bytes, and bit pairs 0-1, 2-3, 4-5, 6-7 of qh[l]; scales go by 16.
void dequant_q6_k(const uint8_t* src, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i) {
        const auto b = load_block<BlockQ6_K>(src, i);
        const float d = half_to_float(b.d);
        for (int half = 0; half < 2; ++half, y += 128) {
            const uint8_t* ql = b.ql + 64 * half;
            const uint8_t* qh = b.qh + 32 * half;
            const int8_t* sc = b.scales + 8 * half;
            for (int l = 0; l < 32; ++l) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * static_cast<float>(sc[is + 0]) * static_cast<float>(q1);
                y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
                y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
                y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
            }
        }
    }
}

}  // namespace

int ggml_block_size(GGMLType type) {
    return traits(type).block_size;
}

std::size_t ggml_type_size(GGMLType type) {
    return traits(type).type_size;
}

std::size_t ggml_row_bytes(GGMLType type, int64_t n) {
    const TypeTraits t = traits(type);
    if (n < 0 || n % t.block_size != 0) {
        throw std::invalid_argument("ggml: row of " + std::to_string(n) + " elements is not a " +
                                    "multiple of the " + ggml_type_name(type) + " block size " +
                                    std::to_string(t.block_size));
    }
    const auto blocks = static_cast<uint64_t>(n / t.block_size);
    if (blocks > std::numeric_limits<std::size_t>::max() / t.type_size) {
        throw std::invalid_argument("ggml: row of " + std::to_string(n) + " " +
                                    ggml_type_name(type) + " elements overflows size_t");
    }
    return static_cast<std::size_t>(blocks) * t.type_size;
}

bool ggml_can_dequantize(GGMLType type) {
    switch (type) {
        case GGMLType::F32:
        case GGMLType::F16:
        case GGMLType::BF16:
        case GGMLType::Q4_0:
        case GGMLType::Q4_1:
        case GGMLType::Q5_0:
        case GGMLType::Q5_1:
        case GGMLType::Q8_0:
        case GGMLType::Q4_K:
        case GGMLType::Q5_K:
        case GGMLType::Q6_K:
            return true;
        default:
            return false;
    }
}

void dequantize_row(GGMLType type, const void* src, float* dst, int64_t n) {
    if (!ggml_can_dequantize(type)) {
        throw std::invalid_argument(std::string("dequantize_row: type ") + ggml_type_name(type) +
                                    " is not supported");
    }
    ggml_row_bytes(type, n);  // validates n
    const auto* s = static_cast<const uint8_t*>(src);
    const int64_t nb = n / ggml_block_size(type);
    switch (type) {
        case GGMLType::F32:
            std::memcpy(dst, s, static_cast<std::size_t>(n) * 4);
            return;
        case GGMLType::F16:
        case GGMLType::BF16:
            for (int64_t i = 0; i < n; ++i) {
                uint16_t h;
                std::memcpy(&h, s + 2 * i, 2);
                dst[i] = type == GGMLType::F16 ? half_to_float(h) : bf16_to_float(h);
            }
            return;
        case GGMLType::Q4_0:
            dequant_q4_0(s, dst, nb);
            return;
        case GGMLType::Q4_1:
            dequant_q4_1(s, dst, nb);
            return;
        case GGMLType::Q5_0:
            dequant_q5_0(s, dst, nb);
            return;
        case GGMLType::Q5_1:
            dequant_q5_1(s, dst, nb);
            return;
        case GGMLType::Q8_0:
            dequant_q8_0(s, dst, nb);
            return;
        case GGMLType::Q4_K:
            dequant_q4_k(s, dst, nb);
            return;
        case GGMLType::Q5_K:
            dequant_q5_k(s, dst, nb);
            return;
        case GGMLType::Q6_K:
            dequant_q6_k(s, dst, nb);
            return;
        default:
            return;  // unreachable: rejected by ggml_can_dequantize above
    }
}

}  // namespace veloxquant
