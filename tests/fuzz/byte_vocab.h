// A small byte-level BPE vocabulary for the fuzz targets: the 256 GPT-2 byte symbols, the merge
// "h e" and the control token <|im_start|>, as a GGUF file's tokenizer keys would hold it.
#pragma once

#include <string>
#include <vector>

#include "byte_symbols.h"
#include "model/tokenizer.h"

namespace vqfuzz {

inline veloxquant::BPETokenizer::Vocab byte_vocab() {
    veloxquant::BPETokenizer::Vocab v;
    v.tokens = vqtest::gpt2_byte_symbols();
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
