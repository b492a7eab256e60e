#include "core/bitpack.h"

#include <cstring>

namespace veloxquant {

void pack_bits(const uint8_t* indices, std::size_t n, int bits, uint8_t* out) {
    std::memset(out, 0, packed_bytes(n, bits));
    if (bits == 8) {
        std::memcpy(out, indices, n);
        return;
    }
    const uint32_t mask = (1u << bits) - 1u;
    std::size_t bit = 0;
    for (std::size_t i = 0; i < n; ++i, bit += static_cast<std::size_t>(bits)) {
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
