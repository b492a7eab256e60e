// A small byte-level BPE vocabulary for the fuzz targets: the 256 GPT-2 byte symbols, the merge
// "h e" and the control token <|im_start|>, as a GGUF file's tokenizer keys would hold it.
#pragma once

#include <string>
#include <vector>

#include "model/tokenizer.h"

namespace vqfuzz {

inline veloxquant::BPETokenizer::Vocab byte_vocab() {
    veloxquant::BPETokenizer::Vocab v;
    // Printable Latin-1 bytes map to themselves, the others to U+0100 onwards (GPT-2's
    // bytes_to_unicode), each symbol UTF-8 encoded.
    int shifted = 0;
    for (int b = 0; b < 256; ++b) {
        const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        const int cp = printable ? b : 0x100 + shifted++;
        std::string s;
        if (cp < 0x80) {
            s += static_cast<char>(cp);
        } else {
            s += static_cast<char>(0xC0 | (cp >> 6));
            s += static_cast<char>(0x80 | (cp & 0x3F));
        }
        v.tokens.push_back(s);
    }
    v.tokens.push_back("he");
    v.tokens.push_back("<|im_start|>");
    v.token_types.assign(v.tokens.size(), veloxquant::kTokenNormal);
    v.token_types.back() = veloxquant::kTokenControl;
    v.merges = {"h e"};
    v.pre = "smollm";
    v.bos_id = v.eos_id = static_cast<int>(v.tokens.size()) - 1;
    return v;
}

}  // namespace vqfuzz
