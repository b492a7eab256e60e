// Bit packing of b-bit indices (1 <= b <= 8) into a contiguous LSB-first bit stream:
// index i occupies bits [i*b, (i+1)*b) of the byte array, bit 0 of byte 0 first.
#pragma once

#include <cstddef>
#include <cstdint>

namespace veloxquant {

constexpr std::size_t packed_bytes(std::size_t n, int bits) {
    return (n * static_cast<std::size_t>(bits) + 7) / 8;
}

/// Writes n indices of `bits` bits each; out must hold packed_bytes(n, bits) bytes.
void pack_bits(const uint8_t* indices, std::size_t n, int bits, uint8_t* out);
/// Reads n indices of `bits` bits each.
void unpack_bits(const uint8_t* packed, std::size_t n, int bits, uint8_t* indices);

/// Reads index i of a packed stream.
inline uint32_t read_packed(const uint8_t* packed, std::size_t i, int bits) {
    const std::size_t bit = i * static_cast<std::size_t>(bits);
    const std::size_t byte = bit >> 3;
    const unsigned shift = bit & 7u;
    uint32_t word = packed[byte];
    if (shift + static_cast<unsigned>(bits) > 8)
        word |= static_cast<uint32_t>(packed[byte + 1]) << 8;
    return (word >> shift) & ((1u << bits) - 1u);
}

}  // namespace veloxquant
