// GPT-2's bytes_to_unicode, written independently of model/tokenizer.cpp for the tests and the
// fuzz targets' vocabularies: the printable bytes '!'..'~', U+00A1..U+00AC and U+00AE..U+00FF
// stand for themselves, every other byte for U+0100 + k in increasing byte order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vqtest {

/// The 256 byte symbols in byte order, each UTF-8 encoded.
inline std::vector<std::string> gpt2_byte_symbols() {
    std::vector<std::string> symbols;
    uint32_t next = 0x100;
    for (uint32_t b = 0; b < 256; ++b) {
        const bool printable =
            (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        const uint32_t cp = printable ? b : next++;
        std::string s;
        if (cp < 0x80) {
            s += static_cast<char>(cp);
        } else {
            s += static_cast<char>(0xC0 | (cp >> 6));
            s += static_cast<char>(0x80 | (cp & 0x3F));
        }
        symbols.push_back(s);
    }
    return symbols;
}

}  // namespace vqtest
