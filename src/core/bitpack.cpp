#include "core/bitpack.h"

#include <cstring>

namespace veloxquant {

void pack_bits(const uint8_t* indices, std::size_t n, int bits, uint8_t* out) {
    if (bits == 8) {
        std::memcpy(out, indices, n);
        return;
    }
    const uint32_t mask = (1u << bits) - 1u;
    // Eight indices fill exactly `bits` bytes: assembled in one word, stored byte by byte
    // (little-endian, whatever the host's order).
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t word = 0;
        for (int k = 0; k < 8; ++k)
            word |= static_cast<uint64_t>(indices[i + k] & mask) << (k * bits);
        uint8_t* dst = out + i / 8 * static_cast<std::size_t>(bits);
        for (int b = 0; b < bits; ++b) dst[b] = static_cast<uint8_t>(word >> (8 * b));
    }
    const std::size_t done = i / 8 * static_cast<std::size_t>(bits);
    std::memset(out + done, 0, packed_bytes(n, bits) - done);
    std::size_t bit = i * static_cast<std::size_t>(bits);
    for (; i < n; ++i, bit += static_cast<std::size_t>(bits)) {
        const uint32_t v = static_cast<uint32_t>(indices[i]) & mask;
        const std::size_t byte = bit >> 3;
        const unsigned shift = bit & 7u;
        out[byte] |= static_cast<uint8_t>(v << shift);
        if (shift + static_cast<unsigned>(bits) > 8)
            out[byte + 1] |= static_cast<uint8_t>(v >> (8 - shift));
    }
}

void unpack_bits(const uint8_t* packed, std::size_t n, int bits, uint8_t* indices) {
    if (bits == 8) {
        std::memcpy(indices, packed, n);
        return;
    }
    for (std::size_t i = 0; i < n; ++i)
        indices[i] = static_cast<uint8_t>(read_packed(packed, i, bits));
}

}  // namespace veloxquant
